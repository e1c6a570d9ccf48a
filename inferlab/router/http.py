"""The router's HTTP pieces around the proxying: its failures and their OpenAI-shaped answers, the
headers passed to a backend, the P/D prefill request, and a watch on a client that leaves."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse

from inferlab.server.openai_format import error_response

T = TypeVar("T")


class NoBackend(Exception):
    """No healthy backend could take the request."""


class BackendFailed(Exception):
    """The backend took the request, then failed or fell silent before answering."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error(status: int, message: str, kind: str = "server_error") -> JSONResponse:
    return error_response(status, message, kind)  # the servers' shape


def client_gone() -> JSONResponse:
    """What nobody reads: nginx's 499 for a client that left."""
    return error(499, "the client closed the connection", "invalid_request_error")


def no_backend() -> JSONResponse:
    return error(503, "no backend is available (all are down or unreachable)")


def auth_headers(raw: Request) -> dict:
    """The client's headers a backend needs: its API key, passed through."""
    return {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}


def sse_error(message: str) -> bytes:
    event = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()


def prefill_body(body: dict) -> dict:
    """The request as the prefill instance gets it: one token, not streamed, one choice."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "max_completion_tokens")}
    return {**out, "max_tokens": 1, "stream": False, "n": 1}


async def watched(work: Awaitable[T], broken: Callable[[], Awaitable[Exception | None]]) -> T:
    """`work`'s result, unless `broken()`, asked every half second while it runs, names an error
    first: `work` is then cancelled (which closes its backend connection) and that error raised."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and (error := await broken()) is not None:
                raise error
        return task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def while_healthy(backend, work: Awaitable[T]) -> T:
    """`work`'s result; httpx.ReadTimeout if `backend`'s health checks time out first (stopped, or
    hung), so that a request with no read timeout of its own still never waits forever. A backend
    that refuses them (a server draining on SIGTERM) still finishes what it has: a dead one's
    connections close, which fails the request at once."""
    async def stopped() -> Exception | None:
        return httpx.ReadTimeout("the backend stopped answering its health checks") if backend.hung else None
    return await watched(work, stopped)


async def unless_gone(raw: Request, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone if the client disconnects first (`work` is then cancelled, which
    closes its backend connection: the backend aborts the request). A plain endpoint is not
    cancelled when its client leaves, and a non-streaming backend sends nothing before its answer
    is whole, so without this the backend would generate to the end for nobody."""
    async def gone() -> Exception | None:
        return ClientGone() if await raw.is_disconnected() else None
    return await watched(work, gone)
