"""The listening socket of each HTTP command (serve, router, scope), bound here rather than by
uvicorn: port 0's pick is then known to the start-up line, and a port is checked before a model loads."""
from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

if TYPE_CHECKING:  # the CLI checks its port with bind() before it imports the web stack
    from fastapi import FastAPI

log = logging.getLogger("inferlab")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds: SO_REUSEADDR), for `uvicorn.Server.run(sockets=)`;
    ValueError in one line if this process cannot listen there (a port another server holds, a host
    that is not this machine's)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def http_url(url: str, what: str) -> SplitResult:
    """`url` split, or a ValueError naming `what` if it is not http(s)://host[:port] with a port from 1 to
    65535 (urlsplit itself raises on a port past 65535 or not a number, and takes 0)."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"{what} is http:// or https://, a host and an optional port from 1 to 65535, "
                         f"e.g. http://127.0.0.1:8000; got {url!r}")
    return parts


def url(host: str, sock: socket.socket) -> str:
    """The address a client uses: the host as given, the port as bound (port 0's pick)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"


GRACEFUL_S = 10.0  # on a signal, how long open requests may still finish (a backend's own drain fits in it)


def run(app: FastAPI, sock: socket.socket) -> None:
    """uvicorn serving `app` on the bound socket until a signal, which is logged; requests still open
    get GRACEFUL_S seconds (a router's stream from a hung backend waited its whole --timeout); the
    socket is closed after."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:
                log.info("%s: stopping; requests still open get %.0f s to finish", signal.Signals(sig).name,
                         GRACEFUL_S)
            super().handle_exit(sig, frame)

    with sock:
        Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_S)).run(sockets=[sock])
