"""What every HTTP request passes before a route runs: the API key, when the server has one, for the
API and the dashboard's lab (vLLM's `--api-key`: `Authorization: Bearer KEY`), a cap on the
body's size, answered with 413 before the body is read whole (unbounded, a 20 MB prompt cost
seconds of parsing and tokenizing before it could be refused), and browsers' cross-origin checks."""
from __future__ import annotations

import functools
import ipaddress
import secrets
import socket

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferlab.server.openai_format import error_response as openai_error

MAX_BODY_BYTES = 8 << 20  # a 128k-token context of text fits several times over
DRAIN_BYTES = 64 << 20  # an over-long body is read this far and dropped, so its client gets the 413
# what the key guards; /health, /metrics, /version and the dashboard's view stay open
PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize", "/scope/lab")  # /api/: Ollama's
# Pages served from this machine, on any port (Ollama's default): a web UI run beside the server
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def loopback(host: str) -> bool:
    """Whether a listening address reaches this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def local_name(host_header: str) -> bool:
    """Whether a request's Host names this machine as a loopback server's own clients do: an IP
    address, localhost (and *.localhost), or this machine's name. A web page that a DNS name resolving
    to 127.0.0.1 served (DNS rebinding) sends its own name instead, and would otherwise be same-origin."""
    if host_header.startswith("["):  # [::1]:8000
        name = host_header[1:].split("]", 1)[0]
    else:  # host:port, or a bare IPv6 address
        name = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    name = name.rstrip(".").lower()
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in _own_names() or name.endswith(".localhost")


@functools.cache
def _own_names() -> tuple[str, ...]:
    """This machine's names, asked once (getfqdn may wait on a DNS server)."""
    return "localhost", socket.gethostname().lower(), socket.getfqdn().lower()


class HostCheck:
    """ASGI middleware for a server on a loopback address: a request whose Host is not a local name
    gets a 403 (Ollama refuses them the same way). A server on another address is reached by other
    names on purpose, and is not checked."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host and not local_name(host):
                return await error_response(403, f"this server listens on a loopback address, and the request "
                                            f"names host {host!r}: only local names are served (DNS "
                                            "rebinding); listen on another address to serve others",
                                            "host_not_allowed", scope)(scope, receive, send)
        await self.app(scope, receive, send)


def add_host_check(app, host: str) -> None:
    """HostCheck on `app` where it listens on loopback `host`."""
    if loopback(host):
        app.add_middleware(HostCheck)


def add_cors(app, allowed_origins: list[str] | None = None) -> None:
    """Answer browsers' cross-origin checks (preflights included, before the key is asked for) for
    pages from this machine and `allowed_origins` ("*": any page). Added last, so it wraps the rest:
    a 401 or 413 still carries the headers a page needs to read it."""
    app.add_middleware(CORSMiddleware, allow_origins=allowed_origins or [], allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["*"], allow_headers=["*"])


def error_response(status: int, message: str, code: str, scope: Scope):
    """OpenAI's error body, or Ollama's `{"error": ...}` under its /api (its clients show the other as a dict)."""
    if scope["path"].startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return openai_error(status, message, code=code)


class Guard:
    """ASGI middleware: `api_key` (None or "": no key needed, as vLLM reads an empty one) and
    `max_body_bytes` as above."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        # an empty key (a compose file's unset $INFERLAB_API_KEY) is none: guarded by it, an empty
        # "Bearer" header got in while no header did not, which looked protected and was not
        self.app, self.api_key, self.max_body_bytes = app, api_key or None, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith(PROTECTED) and not self._authorized(scope):
            return await error_response(401, "invalid or missing API key: send the header "
                                        "'Authorization: Bearer <key>'", "invalid_api_key", scope)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self._read_body(scope, receive)
        if body is None:
            too_large = error_response(413, f"the request body is larger than {self.max_body_bytes >> 20} MiB",
                                       "request_too_large", scope)
            await too_large(scope, receive, send)
            return await self._drain(receive)
        replayed = False

        async def replay() -> Message:  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), self.api_key.encode())

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if it is (or says it is) over the cap."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _drain(self, receive: Receive) -> None:
        read = 0
        while read < DRAIN_BYTES:
            message = await receive()
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
