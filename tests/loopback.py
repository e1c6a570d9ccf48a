"""Serve an ASGI app from a thread on a loopback port, for tests that talk to it over HTTP."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


def bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))  # bound before the server starts: no free-port race
    return sock


@contextmanager
def serving(app, sock: socket.socket | None = None) -> Iterator[str]:
    """The app's base URL while it serves on `sock` (a fresh port if None); stopped on exit."""
    sock = sock or bound_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=2)
        server.force_exit = True  # requests still held (a stopped backend's) no longer keep it up for 30 s
        thread.join(timeout=30)
        sock.close()
