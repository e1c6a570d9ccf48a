"""`inferlab serve`: load the engine, start its thread, serve the API and the dashboard with uvicorn
until a signal. The one place that puts the OpenAI routes (`server.app`) and the dashboard
(`scope.live`) on one app: neither package imports the other."""
from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from inferlab.async_engine import AsyncEngine
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine, model_name
from inferlab.scope.live import mount_scope
from inferlab.scope.recorder import Recorder
from inferlab.server.app import build_app

log = logging.getLogger("inferlab")


def build_server_app(engine: AsyncEngine, name: str) -> FastAPI:
    """The OpenAI API under /v1, /health, /metrics, and the dashboard at /scope."""
    app = build_app(engine, name)
    mount_scope(app, engine)
    return app


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, record: str | None = None) -> None:
    core = LLMEngine(config)
    recorder = Recorder(core, record) if record else None  # before the engine thread steps
    engine = AsyncEngine(core)
    name = served_model_name or model_name(config.model)
    app = build_server_app(engine, name)
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
