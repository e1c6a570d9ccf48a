"""The router's HTTP app: /v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings and
vLLM's /classify, /score and /rerank proxied to a backend (streams passed through as they come), /v1/models, /health
and /metrics with per-backend counts.

Each request goes to a healthy backend the routing policy chooses; one that cannot be reached is
taken out of rotation and the request tried on another. In P/D mode (`prefill` and `decode`
backends) the prompt first goes to a prefill instance with max_tokens=1, which computes it and
saves its KV to the shared store; then the whole request goes to a decode instance, which loads
that KV instead of computing it. A prefill that fails only costs time: the decode instance then
computes the prompt itself. A backend that dies mid-stream ends the client's stream with an error
event; one that is up but silent ends it after `timeout` seconds; a plain request waits for its
answer while its backend passes its health checks. Nothing waits forever.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from inferlab.router.backends import Backend, health_loop, prefix_keys
from inferlab.router.http import (
    BackendFailed,
    ClientGone,
    NoBackend,
    auth_headers,
    client_gone,
    error,
    no_backend,
    prefill_body,
    sse_error,
    unless_gone,
    while_healthy,
)
from inferlab.router.policy import make_policy
from inferlab.server.guard import Guard

log = logging.getLogger("inferlab")
# Failures before a backend's answer began, after which the request is tried on another backend
RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout)


def build_router_app(backends: list[Backend], policy: str = "round_robin", prefill: list[Backend] | None = None,
                     timeout: float = 300.0, health_interval: float = 2.0) -> FastAPI:
    """`backends` serve whole requests (in P/D mode: the decode instances); `prefill`, if given,
    computes each prompt first. Each pool has its own instance of the routing `policy`: a shared
    one would mix the pools' turns and prefix homes."""
    prefill = prefill or []
    everyone = prefill + backends
    pools = {"serve": (backends, make_policy(policy)), "prefill": (prefill, make_policy(policy))}
    state: dict = {"requests": 0, "failed": 0, "prefill_failed": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        state["client"] = client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=2.0), limits=limits)
        await asyncio.gather(*(b.check(client, 2.0) for b in everyone))  # a backend down at start: out at once
        task = asyncio.create_task(health_loop(everyone, client, health_interval))
        yield
        task.cancel()
        await client.aclose()

    app = FastAPI(title="InferLab router", lifespan=lifespan)
    app.add_middleware(Guard)  # the servers' cap on a body's size, before it is read whole (a key is theirs to check)

    @app.exception_handler(HTTPException)  # the router's own 404s and 405s, in OpenAI's shape
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    def pick(role: str, body: dict, tried: set[int]) -> Backend:
        pool, route = pools[role]
        live = [b for b in pool if b.healthy and id(b) not in tried]
        if not live:
            raise NoBackend
        return live[route.choose(prefix_keys(body), live)]

    async def send(role: str, body: dict, path: str, headers: dict) -> tuple[Backend, httpx.Response]:
        """Open the request on a backend of the pool (`serve` or `prefill`) that its policy picks, another
        if that one did not take it: unreachable, closed the connection before answering (killed),
        answered 503 (draining for a restart), or failed its health checks while the request waited."""
        client: httpx.AsyncClient = state["client"]
        # A stream is cut after `timeout` s of silence. A plain request is silent until its answer is
        # whole, however long that takes: it waits while its backend passes its health checks.
        limit = httpx.Timeout(timeout if body.get("stream") else None, connect=2.0)
        # NaN or a lone surrogate (escaped) as sent, for the backend to judge: httpx's encoder raised (a 500)
        payload = json.dumps(body).encode()
        tried: set[int] = set()
        while True:
            backend = pick(role, body, tried)
            tried.add(id(backend))
            backend.requests += 1
            backend.in_flight += 1
            try:
                req = client.build_request("POST", backend.url + path, content=payload, timeout=limit,
                                           headers={**headers, "content-type": "application/json"})
                resp = await while_healthy(backend, client.send(req, stream=True))
            except BaseException as e:  # no answer to count it by: cancelled (the client left) or failed
                backend.in_flight -= 1
                if not isinstance(e, httpx.HTTPError):
                    raise
                backend.errors += 1
                if not isinstance(e, RETRIED):
                    raise BackendFailed(f"backend {backend.url} failed: {type(e).__name__}") from None
                backend.mark(False, f"{type(e).__name__}: {e}")  # it answered nothing: another may
                continue
            if resp.status_code != 503:
                return backend, resp
            backend.in_flight -= 1
            await resp.aclose()
            backend.mark(False, "it answered 503 (shutting down, or its engine is dead)")

    async def run_prefill(body: dict, path: str, headers: dict) -> Response | None:
        """The P/D prefill; a client error (4xx) is returned as is, anything else lets decode go on."""
        try:
            backend, resp = await send("prefill", prefill_body(body), path, headers)
        except (NoBackend, BackendFailed) as e:
            state["prefill_failed"] += 1
            log.warning("no prefill (%s); the decode instance computes the prompt", str(e) or "no backend is up")
            return None
        try:
            content = await while_healthy(backend, resp.aread())
        except httpx.HTTPError as e:
            backend.errors += 1
            state["prefill_failed"] += 1
            log.warning("prefill on %s failed (%s); the decode instance computes the prompt", backend.url, e)
            return None
        finally:
            backend.in_flight -= 1
            await resp.aclose()
        if 400 <= resp.status_code < 500:
            return Response(content, resp.status_code, media_type="application/json")
        if resp.status_code != 200:
            backend.errors += 1
            state["prefill_failed"] += 1
        return None

    async def proxy(raw: Request, path: str, disaggregated: bool = True) -> Response:
        """`disaggregated`: the prompt goes to a prefill instance first, if there are any (an
        embedding's does not: its prompt is all the work)."""
        state["requests"] += 1
        try:
            body = await raw.json()
        except (ValueError, RecursionError):  # RecursionError: a body nested past Python's stack
            return error(400, "the request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object", "invalid_request_error")
        headers = auth_headers(raw)
        if prefill and disaggregated:
            try:
                refused = await unless_gone(raw, run_prefill(body, path, headers))
            except ClientGone:
                return client_gone()
            if refused is not None:
                return refused
        try:
            if body.get("stream"):
                backend, resp = await send("serve", body, path, headers)
                if resp.status_code == 200:
                    return StreamingResponse(relay(backend, resp), media_type="text/event-stream")
                return await whole(backend, resp)
            return await unless_gone(raw, ask(body, path, headers))
        except ClientGone:
            return client_gone()
        except NoBackend:
            state["failed"] += 1
            return no_backend()
        except BackendFailed as e:
            state["failed"] += 1
            return error(502, str(e))

    async def ask(body: dict, path: str, headers: dict) -> Response:
        return await whole(*await send("serve", body, path, headers))

    async def whole(backend: Backend, resp: httpx.Response) -> Response:
        """The backend's answer read whole, as the router's."""
        try:
            content = await while_healthy(backend, resp.aread())
        except httpx.HTTPError as e:
            backend.errors += 1
            raise BackendFailed(f"backend {backend.url} failed mid-request: {type(e).__name__}") from None
        finally:
            backend.in_flight -= 1
            await resp.aclose()
        return Response(content, resp.status_code, media_type=resp.headers.get("content-type"))

    async def relay(backend: Backend, resp: httpx.Response):
        """Pass the stream through event by event; if the backend dies, end it with an error event."""
        buf = b""
        try:
            async for chunk in resp.aiter_raw():
                buf += chunk
                cut = buf.rfind(b"\n\n") + 2
                if cut > 1:
                    yield buf[:cut]
                    buf = buf[cut:]
        except httpx.HTTPError as e:  # died or fell silent mid-stream: a half event is dropped
            backend.errors += 1
            state["failed"] += 1
            backend.mark(False, f"stream broke: {type(e).__name__}")
            yield sse_error(f"backend {backend.url} failed mid-stream: {type(e).__name__}")
        finally:
            backend.in_flight -= 1
            await resp.aclose()

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await proxy(raw, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await proxy(raw, "/v1/chat/completions")

    @app.post("/v1/responses")  # (its P/D split would need max_tokens: not split)
    @app.post("/v1/embeddings")
    @app.post("/classify")
    @app.post("/score")
    @app.post("/v1/score")
    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def pooling(raw: Request) -> Response:  # (a pooling request's prompt is all its work: no P/D split)
        return await proxy(raw, raw.url.path, disaggregated=False)

    @app.get("/v1/models")
    async def models(raw: Request) -> Response:
        return await ask_any(raw, "/v1/models")

    @app.get("/v1/models/{model_id:path}")
    async def model(raw: Request, model_id: str) -> Response:
        return await ask_any(raw, f"/v1/models/{quote(model_id, safe='')}")

    async def ask_any(raw: Request, path: str) -> Response:
        """A GET that any healthy backend answers alike (they serve one model)."""
        headers = auth_headers(raw)
        for b in [b for b in backends if b.healthy]:
            try:
                resp = await state["client"].get(f"{b.url}{path}", headers=headers, timeout=5.0)
                return Response(resp.content, resp.status_code, media_type="application/json")
            except httpx.HTTPError:
                b.mark(False, f"{path} failed")
        return no_backend()

    @app.get("/health")
    async def health() -> Response:
        up = any(b.healthy for b in backends)
        return JSONResponse({"status": "ok" if up else "no backend", "backends": {b.url: b.healthy for b in everyone}},
                            status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = []
        for name in ("requests", "failed", "prefill_failed"):  # typed, so a scraper's rate() treats them as counters
            lines += [f"# TYPE inferlab_router_{name}_total counter", f"inferlab_router_{name}_total {state[name]}"]
        for name, value in (("up", lambda b: int(b.healthy)), ("in_flight", lambda b: b.in_flight),
                            ("requests_total", lambda b: b.requests), ("errors_total", lambda b: b.errors)):
            lines.append(f"# TYPE inferlab_router_backend_{name} {'counter' if 'total' in name else 'gauge'}")
            lines += [f'inferlab_router_backend_{name}{{backend="{b.url}",role="{b.role}"}} {value(b)}'
                      for b in everyone]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
