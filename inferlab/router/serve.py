"""`inferlab router`: its options checked, then the router app (`app.py`) served."""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

from inferlab.router.app import build_router_app
from inferlab.router.backends import Backend
from inferlab.router.policy import make_policy

log = logging.getLogger("inferlab")


def serve_router(backends: list[str], prefill: list[str], decode: list[str], policy: str = "round_robin",
                 host: str = "127.0.0.1", port: int = 8080, timeout: float = 300.0,
                 health_interval: float = 2.0, allowed_origins: list[str] | None = None) -> None:
    """`inferlab router`: --backend URLs, or P/D mode's --prefill and --decode URLs."""

    from inferlab.server import listen
    from inferlab.server.guard import add_cors
    if backends and (prefill or decode):
        raise ValueError("give either --backend URLs, or --prefill and --decode URLs (P/D mode), not both")
    if not backends and not (prefill and decode):
        raise ValueError("give --backend URL (repeatable), or both --prefill URL and --decode URL")
    make_policy(policy)  # an unknown name fails here, before the server starts
    for url in [*backends, *prefill, *decode]:
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or 0 < parts.port  # urlsplit refuses a port past 65535 or not a number
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise ValueError(f"a backend URL is http:// or https://, a host and an optional port from 1 to 65535, "
                             f"e.g. http://127.0.0.1:8000; got {url!r}")
    if not timeout > 0 or not health_interval > 0:
        raise ValueError(f"--timeout and --health-interval must be above 0 seconds, got {timeout} and "
                         f"{health_interval}")
    serving = [Backend(u) for u in backends] or [Backend(u, "decode") for u in decode]
    app = build_router_app(serving, policy, [Backend(u, "prefill") for u in prefill], timeout, health_interval)
    add_cors(app, allowed_origins)  # the instances' own answers are not seen by the browser: the router's are
    sock = listen.bind(host, port)
    log.info("routing on %s to %s (%s)", listen.url(host, sock), ", ".join(backends) if backends else
             f"prefill {', '.join(prefill)} then decode {', '.join(decode)}", policy)
    listen.run(app, sock)
