"""The listening socket of each HTTP command (serve, router, scope), bound here rather than by
uvicorn: port 0's pick is then known to the start-up line, and a port is checked before a model loads."""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI checks its port with bind() before it imports the web stack
    from fastapi import FastAPI


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


def url(host: str, sock: socket.socket) -> str:
    """The address a client uses: the host as given, the port as bound (port 0's pick)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"


def run(app: FastAPI, sock: socket.socket) -> None:
    """uvicorn serving `app` on the bound socket until a signal; the socket is closed after."""
    import uvicorn

    with sock:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
