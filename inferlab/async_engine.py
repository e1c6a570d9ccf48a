"""AsyncEngine: one thread owns the LLMEngine and steps it; asyncio code talks to it by message.

Only the engine thread touches the engine. HTTP handlers submit operations (add, abort), which
run between two steps; outputs travel back to each request's asyncio queue. So requests from
every connection join the same running batch (continuous batching across clients), and a
handler never blocks the event loop while a step runs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferlab.distributed import EngineDeadError
from inferlab.engine import LLMEngine
from inferlab.inputs import check_request_id
from inferlab.metrics import EngineMetrics
from inferlab.outputs import CompletionOutput, RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.stream import RequestStream, Stream

log = logging.getLogger("inferlab")
HEALTH_S = 1.0  # how often an idle engine checks it can still step


class EngineStopping(RuntimeError):
    """Raised by `add` once the server is shutting down."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        """`engine`, or a function that builds it, called on the engine thread (its errors are
        raised here). Build it there where you can, as `inferlab serve` does: OpenMP keeps a pool of
        workers for each thread that starts parallel work, and once a process holds more of them
        than it has cores, libgomp stops spinning between parallel regions, so each of a decode
        step's few hundred kernels waits for a sleeping worker to wake. A model loaded on the main
        thread and stepped here made each token 3-5x slower on a 2-core machine."""
        self.metrics = EngineMetrics()
        self._ops: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future] | None] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        built: concurrent.futures.Future = concurrent.futures.Future()
        # the thread holds the engine weakly: one dropped without shutdown() (a notebook cell run again)
        # is freed, and its thread ends, instead of a whole model kept for each
        self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self), engine, built),
                                        name="inferlab-engine", daemon=True)
        self._stopped = False
        self.stopping = False  # set by drain(): a shutdown has begun, new requests are refused
        self.dead: EngineDeadError | None = None  # set when the engine can run no more steps
        self.on_dead: Callable[[], None] | None = None  # e.g. stop the server
        self._thread.start()
        self.engine: LLMEngine = built.result()
        self.snapshot: dict = self.engine.snapshot()  # refreshed by the engine thread after every step

    # -- the engine thread --------------------------------------------------------------------
    def _turn(self) -> bool:
        """One turn of the engine thread: the operations waiting, then a step; False once shut down."""
        busy = self.engine.has_unfinished_requests() and self.dead is None
        try:  # block for work only when the engine is idle, looking up now and then
            item = self._ops.get(block=not busy, timeout=HEALTH_S)
        except queue.Empty:
            item = ()
            if not busy and self.dead is None:
                self._check_health()
        while item != ():
            if item is None:
                return False
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                item = self._ops.get_nowait()
            except queue.Empty:
                item = ()
        if self.engine.has_unfinished_requests() and self.dead is None:
            self._step()
        self.snapshot = self.engine.snapshot()
        return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError as e:  # a tensor-parallel rank failed: fail every request, stop serving
            self._die(e)
            return
        except Exception as e:  # noqa: BLE001 - the engine isolates the model's faults per request; this
            # is anything else (a scheduling policy, a connector): the step cannot be trusted with the
            # requests it holds, so they fail, once, instead of the same step failing again at once forever
            log.exception("engine step failed: every request it held fails")
            why = f"the engine step failed: {type(e).__name__}: {e}"
            try:
                for rid in list(self.engine.requests):
                    self._abort_now(rid, why)
            except Exception:  # noqa: BLE001 - it cannot even let go of them
                log.exception("aborting the failed step's requests failed too")
                self._die(EngineDeadError(why))
            return
        now = time.monotonic()
        for out in outputs:
            self.metrics.observe(out, now)
            self._deliver(out)
        self.metrics.observe_step(self.engine.last_step_tokens)

    def _check_health(self) -> None:
        """An idle engine can still die (a tensor-parallel worker killed): fail now, so the server
        stops on its own instead of at the next request."""
        try:
            self.engine.check_health()
        except EngineDeadError as e:
            self._die(e)

    def _die(self, e: EngineDeadError) -> None:
        """Fail every request and stop serving."""
        log.error("the engine cannot continue: %s", e)
        self.dead = e
        for rid in list(self._streams):
            try:
                self._abort_now(rid, str(e))
            except Exception:  # noqa: BLE001 - its stream still gets an error, below
                self._deliver(RequestOutput(rid, None, [], [CompletionOutput(0, "", [], "error")], True, error=str(e)))
        if self.on_dead is not None:
            self.on_dead()

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if out.finished:
            self._streams.pop(out.request_id, None)
        if stream is not None:
            loop, q = stream
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the event loop is already closed: nobody is listening
                pass

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._ops.put((fn, fut))
        return fut

    # -- the asyncio side ---------------------------------------------------------------------
    async def add(self, request_id: str, prompt: Any, params: SamplingParams,
                  priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Add a request (raises ValueError at once if it is refused) and return the stream of
        its outputs. If the consumer stops early (a client went away), the request is aborted
        and its KV blocks are freed."""
        return (await self.add_many([(request_id, prompt, params, priority)]))[0]

    async def add_many(self, requests: list[tuple[str, Any, SamplingParams, int]]) -> list[Stream]:
        """`add` for several (request id, prompt, params, priority) in one pass between two steps, all
        or none: one refused leaves none added. One pass, not one a step: a body of 1,000 prompts
        would otherwise take 1,000 steps to be admitted, and its client's leaving goes unseen meanwhile."""
        if self.stopping or self.dead is not None:
            raise EngineStopping("the server is shutting down")
        for rid, *_ in requests:  # before a live request's stream is touched (it would lose its consumer)
            check_request_id(rid, self._streams)
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in requests]
        for (rid, *_), q in zip(requests, queues, strict=True):
            self._streams[rid] = (loop, q)

        def add_all() -> None:  # on the engine thread
            added = []
            try:
                for rid, prompt, params, priority in requests:
                    self.engine.add_request(rid, prompt, params, priority=priority)
                    added.append(rid)
            except BaseException:
                for rid in added:
                    self.engine.abort_request(rid)
                raise
        try:
            await asyncio.wrap_future(self._call(add_all))
        except BaseException as e:
            for rid, *_ in requests:
                self._streams.pop(rid, None)
            if not isinstance(e, Exception):  # cancelled: the engine thread may have added them all the same
                self._call(lambda: [self.engine.abort_request(rid) for rid, *_ in requests])
            raise
        return [RequestStream(self, rid, q) for (rid, *_), q in zip(requests, queues, strict=True)]

    def abort(self, request_id: str) -> None:
        """The consumer is gone: drop its stream and free the request's blocks. A no-op for a
        request that has already finished."""
        self._streams.pop(request_id, None)
        self._call(lambda: self._abort_now(request_id))

    def cancel(self, request_id: str) -> concurrent.futures.Future:
        """Abort a request whose consumer still listens: it gets the final "abort" output. The future
        says whether it was aborted (False: it had already finished)."""
        return self._call(lambda: self._abort_now(request_id))

    def _abort_now(self, request_id: str, error: str | None = None) -> bool:  # on the engine thread
        out = self.engine.abort_request(request_id, error)
        if out is not None:
            self.metrics.observe(out, time.monotonic())
            self._deliver(out)
        return out is not None

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps (e.g. to read or reset engine state)."""
        return await asyncio.wrap_future(self._call(fn))

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the engine thread between steps, without waiting (e.g. from a `finally`)."""
        self._call(fn)

    def _abort_all(self) -> None:  # on the engine thread: each waiting consumer gets a final "abort" output
        for rid in list(self._streams):
            self._abort_now(rid)

    def drain(self, grace: float) -> None:
        """Begin a shutdown: refuse new requests, give running ones `grace` seconds to finish, then
        abort the rest, so every client still gets an answer (a stream ends with its finish reason
        and [DONE]) before the HTTP server stops waiting for them. Safe to call from a signal handler."""
        if self.stopping:
            if grace <= 0:  # hurried along: the rest of the grace is given up
                self._call(self._abort_all)
            return
        self.stopping = True
        timer = threading.Timer(grace, lambda: self._call(self._abort_all))
        timer.daemon = True
        timer.start()

    def shutdown(self) -> None:
        """Abort whatever is still running and stop the engine thread."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        self._call(self._abort_all)
        self._ops.put(None)
        self._thread.join(timeout=10)


def _engine_thread(owner: weakref.ref[AsyncEngine], engine: LLMEngine | Callable[[], LLMEngine],
                   built: concurrent.futures.Future) -> None:
    """The engine thread: builds the engine, then takes turns while its AsyncEngine lives."""
    this = owner()
    try:
        this.engine = engine() if callable(engine) else engine  # an engine itself is not callable
    except BaseException as e:  # noqa: BLE001 - raised in the thread that asked for the engine
        built.set_exception(e)
        return
    built.set_result(this.engine)
    del this  # held only during a turn
    while (this := owner()) is not None and this._turn():
        del this
