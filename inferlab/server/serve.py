"""`inferlab serve`: load the engine, start its thread, serve the API and the dashboard with uvicorn
until a signal. The one place that puts the OpenAI routes (`server.app`) and the dashboard
(`scope.live`) on one app: neither package imports the other."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from inferlab.async_engine import AsyncEngine
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.model.loader import model_name
from inferlab.scope.live import mount_scope
from inferlab.scope.recorder import Recorder
from inferlab.server import listen, openapi
from inferlab.server.app import build_app
from inferlab.server.guard import Guard, add_cors, add_host_check

log = logging.getLogger("inferlab")

DRAIN_S = 5.0  # on SIGINT / SIGTERM: how long running requests may still finish before they are aborted
GRACEFUL_S = DRAIN_S + 3  # uvicorn's wait for the aborted ones to send their last bytes


def build_server_app(engine: AsyncEngine, name: str, api_key: str | None = None,
                     allowed_origins: list[str] | None = None, prompt_tokens_details: bool = False,
                     host: str = "0.0.0.0", tool_parser: str | None = None,
                     reasoning_parser: str | None = None) -> FastAPI:
    """The OpenAI API under /v1, Ollama's under /api, /health, /metrics, and the dashboard at /scope,
    behind the guard (the API key for /v1, /api and the lab, a cap on body size, cross-origin checks,
    and on a loopback `host` the Host header's)."""
    app = build_app(engine, name, prompt_tokens_details, tool_parser, reasoning_parser)
    mount_scope(app, engine)
    app.add_middleware(Guard, api_key=api_key)
    add_host_check(app, host)
    add_cors(app, allowed_origins)
    openapi.install(app)
    return app


class Server(uvicorn.Server):
    """uvicorn, whose shutdown on a signal first drains the engine: uvicorn stops taking connections
    and waits for open ones, and the engine gives running requests DRAIN_S seconds, then aborts the
    rest, so each client gets a whole answer (uvicorn alone cancels handlers mid-stream)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.engine, self.on_stop = engine, on_stop
        self.hurried = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if not self.should_exit:
            log.info("%s: stopping; requests still running get %.0f s to finish (again: abort them now)", name,
                     DRAIN_S)
        elif not self.hurried:  # a second signal: what runs is aborted now, each client still getting its end
            self.hurried = True  # (uvicorn's own second signal cut every stream and answered plain requests 500)
            log.info("%s again: aborting the running requests now (a third time: exit at once)", name)
            self.engine.drain(0)
            return
        else:  # a third: exit without waiting, whatever the signal (uvicorn forces an exit on SIGINT alone)
            self.force_exit = True
        super().handle_exit(sig, frame)
        self.engine.drain(DRAIN_S)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Once stopped, uvicorn raises the signal that stopped it again, and SIGTERM's default action
        ends the process right there: `on_stop` (the engine thread, tensor-parallel workers, the
        recording) runs before that."""
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_stop()
        # Still here after SIGTERM was raised again: this process is PID 1 (a container without an init),
        # whose signals' default actions the kernel ignores; exit as that action would have (143, not 0)
        if signal.SIGTERM in getattr(self, "_captured_signals", ()):
            sys.exit(128 + signal.SIGTERM)


def unpolled(record: logging.LogRecord) -> bool:
    """An access line but for the paths a router or Prometheus polls every few seconds."""
    args = record.args if isinstance(record.args, tuple) else ()
    return len(args) < 3 or str(args[2]).split("?")[0] not in ("/health", "/metrics")


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          record: str | None = None, api_key: str | None = None, allowed_origins: list[str] | None = None,
          prompt_tokens_details: bool = False, access_log: bool = True, tool_parser: str | None = None,
          reasoning_parser: str | None = None) -> None:
    """`access_log`: a line per HTTP request (client, method and path, status), as vLLM's server logs them;
    `tool_parser`: how the model writes tool calls (server/tools.py), for tool_choice "auto";
    `reasoning_parser`: how it writes its reasoning (server/reasoning.py)."""
    recorder: Recorder | None = None

    def build() -> LLMEngine:  # on the engine thread (see AsyncEngine), before it steps
        nonlocal recorder
        core = LLMEngine(config)
        recorder = Recorder(core, record) if record else None
        return core
    engine = AsyncEngine(build)
    core = engine.engine
    name = served_model_name or model_name(config.model)
    app = build_server_app(engine, name, api_key, allowed_origins, prompt_tokens_details, host, tool_parser,
                           reasoning_parser)
    sock = listen.bind(host, port)
    log.info("serving %s on %s (OpenAI API under /v1, Ollama's under /api, metrics at /metrics, dashboard at /scope%s)",
             name, listen.url(host, sock), "; an API key guards the API and the lab" if api_key else "")

    def stop() -> None:  # each part may be stopped twice: the second time does nothing
        engine.shutdown()
        core.shutdown()  # tensor-parallel workers, a KV connector
        if recorder is not None:
            recorder.close()
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=GRACEFUL_S), engine, stop)
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.addFilter(unpolled)
    # a tensor-parallel rank failed, or a failed step's requests could not even be aborted
    engine.on_dead = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=[sock])
    finally:
        stop()
        sock.close()
    if engine.dead is not None:
        raise engine.dead
