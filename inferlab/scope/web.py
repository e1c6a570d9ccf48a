"""The dashboard page itself: /scope, its static files (shipped in the package, nothing to build)
and /scope/info, the same for the live server and for replay."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_pages(app: FastAPI, info: Callable[[], dict]) -> None:
    """`info()` is the trace header (mode "live" or "replay"); the page reads it first."""
    app.mount("/scope/static", StaticFiles(directory=STATIC), name="scope-static")

    @app.get("/scope", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/scope/", include_in_schema=False)
    async def page_slash() -> RedirectResponse:
        return RedirectResponse("/scope")

    @app.get("/scope/info")
    async def scope_info() -> dict:
        return info()
