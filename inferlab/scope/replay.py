"""`inferlab scope --replay trace.jsonl`: the dashboard page fed from a recorded trace; the page
loads the frames and plays them (play / pause / step / time slider) by itself."""
from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse

from inferlab.scope.recorder import read_trace
from inferlab.scope.web import mount_pages

log = logging.getLogger("inferlab")


def build_replay_app(path: str) -> FastAPI:
    """Read (and check) the trace once; ValueError if it is not one."""
    head, frames = read_trace(path)
    body = "\n".join(frames) + "\n"
    app = FastAPI(title="InferLab scope replay")
    mount_pages(app, lambda: {**head, "mode": "replay", "frames": len(frames), "file": path})

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/scope")

    @app.get("/scope/trace")
    async def trace() -> PlainTextResponse:
        return PlainTextResponse(body, media_type="application/x-ndjson")

    return app


def serve_replay(path: str, host: str = "127.0.0.1", port: int = 8001) -> None:
    app = build_replay_app(path)
    log.info("replaying %s at http://%s:%d/scope", path, host, port)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
