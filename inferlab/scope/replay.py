"""`inferlab scope --replay trace.jsonl`: the dashboard page fed from a recorded trace; the page
loads the frames and plays them (play / pause / step / time slider) by itself. Given several
traces (`--replay a.jsonl --replay b.jsonl`, e.g. vLLM's timeline and InferLab's from the surgery
room), /scope?trace=K shows the K-th and /scope/beside shows them all side by side."""
from __future__ import annotations

import html
import logging
import os

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

from inferlab.scope.frames import shown
from inferlab.scope.recorder import read_trace
from inferlab.scope.web import mount_pages
from inferlab.server import listen
from inferlab.server.guard import add_host_check

log = logging.getLogger("inferlab")


def build_replay_app(*paths: str) -> FastAPI:
    """Read (and check) the traces once; ValueError if one is not a trace."""
    traces = [(path, *read_trace(path)) for path in paths]
    bodies = ["\n".join(frames) + "\n" for _, _, frames in traces]
    app = FastAPI(title="InferLab scope replay")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]  # one line, in the shape of the 404 below (FastAPI's own is a 422 list)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)

    def chosen(trace: int) -> int:
        if not 0 <= trace < len(traces):
            raise HTTPException(404, f"no trace {trace}: {len(traces)} loaded")
        return trace

    @app.get("/scope/info")  # before mount_pages' own /scope/info, which it shadows: it takes ?trace=K
    async def info(trace: int = 0) -> dict:
        path, head, frames = traces[chosen(trace)]
        return {**head, "config": shown(head.get("config") or {}), "mode": "replay", "frames": len(frames),
                "file": os.path.basename(path)}

    mount_pages(app, lambda: {})

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/scope/beside" if len(traces) > 1 else "/scope")

    @app.get("/scope/trace")
    async def trace(trace: int = 0) -> PlainTextResponse:
        return PlainTextResponse(bodies[chosen(trace)], media_type="application/x-ndjson")

    @app.get("/scope/beside", include_in_schema=False)
    async def beside() -> HTMLResponse:
        frames = "".join(f'<iframe src="/scope?trace={k}" title="{html.escape(os.path.basename(path))}"></iframe>'
                         for k, (path, _, _) in enumerate(traces))
        return HTMLResponse('<!doctype html><meta charset="utf-8"><title>InferLab scope: side by side</title>'
                            '<link rel="icon" href="data:,">'
                            '<style>body{margin:0;display:flex;height:100vh;background:#0f1216}'
                            'iframe{flex:1;border:0;border-right:2px solid #2a3038}</style>' + frames)

    return app


def serve_replay(paths: list[str], host: str = "127.0.0.1", port: int = 8001) -> None:
    app = build_replay_app(*paths)
    add_host_check(app, host)
    page = "scope/beside" if len(paths) > 1 else "scope"
    sock = listen.bind(host, port)
    log.info("replaying %s at %s/%s", ", ".join(paths), listen.url(host, sock), page)
    listen.run(app, sock)
