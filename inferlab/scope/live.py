"""The live dashboard on `inferlab serve`: frames streamed to viewers over SSE (/scope/events) and
the lab panel's bursts (/scope/lab).

Frames are built on the engine thread, as a step observer that exists only while a viewer is
connected, at most `interval` apart (and after the step that empties the engine, so a view never
stops on a stale state). Each frame is built once and sent to every viewer, however many watch. A
viewer that connects (or reconnects) first gets a full frame with the recent step history. While
no step runs, one tick a second sends every viewer a fresh frame if something changed (a request
added or aborted between steps), else an SSE comment that keeps the connection alive.
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from inferlab.async_engine import AsyncEngine, EngineStopping
from inferlab.outputs import RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.scope.frames import FrameBuilder, encode, header
from inferlab.scope.lab import MAX_BURST, Burst, burst_prompts
from inferlab.scope.web import mount_pages

QUEUE_FRAMES = 4  # frames a slow viewer may lag behind before the oldest are dropped
HEARTBEAT_S = 1.0
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: viewers ignore it, proxies see the stream is alive


def offer(q: asyncio.Queue, item: str | None) -> None:
    if q.full():
        q.get_nowait()
    q.put_nowait(item)


class ScopeFeed:
    def __init__(self, engine: AsyncEngine, interval: float = 0.2) -> None:
        self.engine = engine
        self.interval = interval
        self.builder = FrameBuilder(engine.engine, engine.metrics)
        self.viewers: dict[int, asyncio.Queue] = {}  # changed on the engine thread only
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, where the viewers' queues live
        self.last_sent = 0.0
        self.sent_state: tuple | None = None  # what the engine looked like in the last frame sent
        self.ticker: asyncio.Task | None = None
        self.frames_built = 0
        self._ids = itertools.count()

    # -- on the engine thread -----------------------------------------------------------------
    def on_step(self, outputs: list[RequestOutput]) -> None:
        self.builder.on_step(outputs)
        now = time.monotonic()
        if now - self.last_sent >= self.interval or not self.engine.engine.has_unfinished_requests():
            self._broadcast(self._frame())

    def _state(self) -> tuple:
        core = self.engine.engine
        return core.scheduler.step_count, len(core.requests), core.block_manager.num_free_blocks

    def _frame(self, with_history: bool = False) -> str:
        self.frames_built += 1
        if not with_history:  # the frame every viewer gets
            self.last_sent, self.sent_state = time.monotonic(), self._state()
        return f"data: {encode(self.builder.frame(with_history))}\n\n"

    def _tick(self) -> str | None:
        """Once a second: nothing if frames are flowing, else a frame if the engine changed, else a keep-alive."""
        if time.monotonic() - self.last_sent < HEARTBEAT_S:
            return None
        return self._frame() if self._state() != self.sent_state else KEEP_ALIVE

    def _broadcast(self, item: str) -> None:
        try:  # one wake-up of the event loop per frame, not one per viewer
            self.loop.call_soon_threadsafe(self._fan_out, item)
        except RuntimeError:  # the event loop has closed: nobody to tell
            pass

    def _join(self, key: int, q: asyncio.Queue) -> str:
        if not self.viewers:  # the first viewer: its own frame is the state the others are compared to
            self.engine.engine.step_observers.append(self.on_step)
            self.sent_state = self._state()
        self.viewers[key] = q
        return self._frame(with_history=True)

    def _leave(self, key: int) -> None:
        self.viewers.pop(key, None)
        if not self.viewers and self.on_step in self.engine.engine.step_observers:
            self.engine.engine.step_observers.remove(self.on_step)

    # -- on the event loop --------------------------------------------------------------------
    def _fan_out(self, item: str | None) -> None:
        for q in list(self.viewers.values()):
            offer(q, item)

    async def _ticking(self) -> None:
        while self.viewers:
            await asyncio.sleep(HEARTBEAT_S)
            if self.engine.stopping and not self.engine.engine.requests:  # a shutdown with nothing left to show:
                self._fan_out(None)  # the streams end, or the server waited its whole graceful time for them
                return
            item = await self.engine.run(self._tick)
            if item is not None:
                self._fan_out(item)

    async def events(self) -> AsyncIterator[str]:
        key, q, self.loop = next(self._ids), asyncio.Queue(QUEUE_FRAMES), asyncio.get_running_loop()
        first = await self.engine.run(lambda: self._join(key, q))
        if self.ticker is None or self.ticker.done():
            self.ticker = asyncio.create_task(self._ticking())
        try:
            yield first
            while (item := await q.get()) is not None:
                yield item
        finally:
            self.engine.post(lambda: self._leave(key))


def mount_scope(app: FastAPI, engine: AsyncEngine) -> ScopeFeed:
    """Add /scope, /scope/info, /scope/events and /scope/lab to the server's app."""
    feed = ScopeFeed(engine)
    core = engine.engine
    mount_pages(app, lambda: header(core, "live"))
    drains: set[asyncio.Task] = set()

    @app.get("/scope/events")
    async def scope_events() -> StreamingResponse:
        return StreamingResponse(feed.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    lab_requests: set[str] = set()  # the lab's requests still live: bounded, and cancellable at once
    cancels = 0  # DELETEs so far: a burst being added when one comes is aborted once it is in

    async def drain(rid: str, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for _ in stream:
                pass
        finally:
            lab_requests.discard(rid)

    @app.post("/scope/lab")
    async def lab(burst: Burst) -> dict:
        """Submit a burst through the same path as the OpenAI endpoints; all or none are added.
        Nobody waits on these requests, so they are bounded: each must fit the engine, and at
        most MAX_BURST run at once (DELETE /scope/lab cancels them)."""
        if burst.prompt_len + burst.output_len > core.max_request_tokens:
            raise HTTPException(400, f"prompt_len + output_len = {burst.prompt_len + burst.output_len} tokens: this "
                                     f"engine holds at most {core.max_request_tokens} tokens per request")
        if len(lab_requests) + burst.count > MAX_BURST:
            raise HTTPException(400, f"{len(lab_requests)} lab requests are still running and at most {MAX_BURST} "
                                     f"may be at once: cancel them (DELETE /scope/lab) or wait")
        prompts = burst_prompts(burst, core.model.args.vocab_size, set(core.eos_token_ids))
        params = SamplingParams(temperature=0.0, max_tokens=burst.output_len, ignore_eos=True)
        base = uuid.uuid4().hex[:6]
        rids = [f"lab-{base}-{i}" for i in range(len(prompts))]
        lab_requests.update(rids)  # counted before the await: two bursts at once passed the cap together
        cancels_before = cancels
        try:  # one pass between steps (one add a step took 12 s for 256, while a cancel missed the rest)
            streams = await engine.add_many([(rid, {"prompt_token_ids": ids}, params, burst.priority)
                                             for rid, ids in zip(rids, prompts, strict=True)])
        except (ValueError, EngineStopping) as e:
            lab_requests.difference_update(rids)
            raise HTTPException(400, str(e)) from None
        for rid, stream in zip(rids, streams, strict=True):
            task = asyncio.ensure_future(drain(rid, stream))
            drains.add(task)
            task.add_done_callback(drains.discard)
        if cancels != cancels_before:  # a DELETE came while they were being added: they go too
            for rid in rids:
                engine.cancel(rid)  # (its drain gets the final output, and the id leaves lab_requests)
        return {"request_ids": rids}

    @app.delete("/scope/lab")
    async def cancel_lab() -> dict:
        """Abort every lab request still running; their KV blocks are freed at once. Counts those
        aborted: one that finished just before (its drain not yet done) is not."""
        nonlocal cancels
        cancels += 1
        aborted = [engine.cancel(rid) for rid in sorted(lab_requests)]  # each drain gets the final output
        return {"cancelled": sum([await asyncio.wrap_future(f) for f in aborted])}

    return feed
