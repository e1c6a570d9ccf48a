"""`inferlab serve`: load the engine, start its thread, serve the app with uvicorn until a signal."""
from __future__ import annotations

import logging

import uvicorn

from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine, model_name
from inferlab.scope.recorder import Recorder
from inferlab.server.app import build_app
from inferlab.server.async_engine import AsyncEngine

log = logging.getLogger("inferlab")


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, record: str | None = None) -> None:
    core = LLMEngine(config)
    recorder = Recorder(core, record) if record else None  # before the engine thread steps
    engine = AsyncEngine(core)
    name = served_model_name or model_name(config.model)
    app = build_app(engine, name)
    log.info("serving %s on http://%s:%d (OpenAI API under /v1, metrics at /metrics, dashboard at /scope)",
             name, host, port)
    # On SIGINT/SIGTERM uvicorn stops accepting, gives in-flight requests a few seconds to
    # finish, then the app's shutdown aborts the rest and stops the engine thread.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        engine.shutdown()
        if recorder is not None:
            recorder.close()
