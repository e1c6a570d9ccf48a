"""`inferlab serve`: load the engine, start its thread, serve the app with uvicorn until a signal."""
from __future__ import annotations

import logging
import os

import uvicorn

from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.model.loader import EMBEDDED_FILE
from inferlab.scope.recorder import Recorder
from inferlab.server.app import build_app
from inferlab.server.async_engine import AsyncEngine

log = logging.getLogger("inferlab")


def default_model_name(model: str | None) -> str:
    if model is None:
        return EMBEDDED_FILE.split(".")[0]  # SmolLM2-135M-Instruct
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, record: str | None = None) -> None:
    core = LLMEngine(config)
    recorder = Recorder(core, record) if record else None  # before the engine thread steps
    engine = AsyncEngine(core)
    name = served_model_name or default_model_name(config.model)
    app = build_app(engine, name)
    log.info("serving %s on http://%s:%d (OpenAI API under /v1, metrics at /metrics, dashboard at /scope)",
             name, host, port)
    # On SIGINT/SIGTERM uvicorn stops accepting, gives in-flight requests a few seconds to
    # finish, then the app's shutdown aborts the rest and stops the engine thread.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    engine.on_dead = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        engine.shutdown()
        core.shutdown()  # tensor-parallel workers
        if recorder is not None:
            recorder.close()
    if engine.dead is not None:
        raise engine.dead
