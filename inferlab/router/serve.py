"""`inferlab router`: its options checked, then the router app (`app.py`) served."""
from __future__ import annotations

import logging

from inferlab.router.app import build_router_app
from inferlab.router.backends import Backend
from inferlab.router.policy import make_policy
from inferlab.server.listen import http_url

log = logging.getLogger("inferlab")


def serve_router(backends: list[str], prefill: list[str], decode: list[str], policy: str = "round_robin",
                 host: str = "127.0.0.1", port: int = 8080, timeout: float = 300.0,
                 health_interval: float = 2.0, allowed_origins: list[str] | None = None) -> None:
    """`inferlab router`: --backend URLs, or P/D mode's --prefill and --decode URLs."""

    from inferlab.server import listen
    from inferlab.server.guard import add_cors, add_host_check
    if backends and (prefill or decode):
        raise ValueError("give either --backend URLs, or --prefill and --decode URLs (P/D mode), not both")
    if not backends and not (prefill and decode):
        raise ValueError("give --backend URL (repeatable), or both --prefill URL and --decode URL")
    make_policy(policy)  # an unknown name fails here, before the server starts
    seen: dict[tuple, str] = {}
    for role, urls in (("backend", backends), ("prefill", prefill), ("decode", decode)):
        for url in urls:
            key = _backend_key(url)
            if key in seen:  # its requests, health checks and counts would all be counted twice
                raise ValueError(f"--{role} {url!r} names the same instance as {seen[key]!r}: give each once")
            seen[key] = url
    if not timeout > 0 or not health_interval > 0:
        raise ValueError(f"--timeout and --health-interval must be above 0 seconds, got {timeout} and "
                         f"{health_interval}")
    serving = [Backend(u) for u in backends] or [Backend(u, "decode") for u in decode]
    app = build_router_app(serving, policy, [Backend(u, "prefill") for u in prefill], timeout, health_interval)
    add_host_check(app, host)
    add_cors(app, allowed_origins)  # the instances' own answers are not seen by the browser: the router's are
    sock = listen.bind(host, port)
    log.info("routing on %s to %s (%s)", listen.url(host, sock), ", ".join(backends) if backends else
             f"prefill {', '.join(prefill)} then decode {', '.join(decode)}", policy)
    listen.run(app, sock)


def _backend_key(url: str) -> tuple:
    """Scheme, host and port of a backend URL, or a ValueError saying what a backend URL is."""
    parts = http_url(url, "a backend URL")
    if parts.path.strip("/") or parts.query or parts.fragment:  # the router adds /v1/...: '/v1' here doubles it
        raise ValueError(f"a backend URL is the instance's root, without a path: the router adds /v1/... "
                         f"itself; got {url!r}")
    return parts.scheme, parts.hostname.lower(), parts.port or {"http": 80, "https": 443}[parts.scheme]
