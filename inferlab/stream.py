"""A request's stream of outputs on the asyncio side of `AsyncEngine`, aborting the request if it is
dropped before its last output."""
from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from inferlab.outputs import RequestOutput

if TYPE_CHECKING:
    from inferlab.async_engine import AsyncEngine

Stream = AsyncIterator[RequestOutput]


class RequestStream:
    """One request's outputs, as an async iterator. Dropped before its last output (the consumer
    stopped, failed, was cancelled, or never read it) it aborts the request and frees its blocks."""

    def __init__(self, engine: AsyncEngine, request_id: str, q: asyncio.Queue) -> None:
        self._q, self._finished = q, False
        self._abort = weakref.finalize(self, engine.abort, request_id)
        self._abort.atexit = False  # at exit the engine thread is gone: nothing to free

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            out: RequestOutput = await self._q.get()
        except BaseException:  # cancelled while waiting: nobody will read the rest
            self._abort()
            raise
        if out.finished:
            self._finished = True
            self._abort.detach()
        return out
