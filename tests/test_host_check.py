"""A server on a loopback address serves only requests that name this machine: a web page on a DNS
name that resolves to 127.0.0.1 (DNS rebinding) is same-origin to the browser, so CORS does not stop
it; its Host header does."""
from __future__ import annotations

import socket

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from inferlab.server.guard import add_host_check, local_name, loopback


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True), ("::1", True),
    ("app.localhost:3000", True), ("10.0.0.5:8000", True), (socket.gethostname(), True),
    ("evil.example:8000", False), ("evil.example", False), ("127.0.0.1.nip.io:8000", False), ("localhost.evil", False),
])
def test_local_names(host, local):
    assert local_name(host) is local


@pytest.mark.parametrize("host, checked", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                           ("::", False)])
def test_only_a_loopback_listener_is_checked(host, checked):
    app = FastAPI()
    app.get("/health")(lambda: {"status": "ok"})
    add_host_check(app, host)
    client = TestClient(app)
    assert loopback(host) is checked
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    answer = client.get("/health", headers={"Host": "rebind.example:8000"})
    assert answer.status_code == (403 if checked else 200)
    if checked:
        assert "names host 'rebind.example:8000': only local names are served" in answer.json()["error"]["message"]


def test_the_server_app_checks_where_it_listens_on_loopback(smol):
    from inferlab.async_engine import AsyncEngine
    from inferlab.config import EngineConfig
    from inferlab.engine import LLMEngine
    from inferlab.server.serve import build_server_app
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), loaded=smol))
    try:
        for host, status in (("127.0.0.1", 403), ("0.0.0.0", 200)):
            client = TestClient(build_server_app(engine, "m", host=host))  # (no lifespan: the engine stays)
            assert client.get("/v1/models", headers={"Host": "rebind.example"}).status_code == status
            assert client.get("/api/tags", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    finally:
        engine.shutdown()
