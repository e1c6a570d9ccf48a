"""One OpenAI request's choices on the engine: added all or none, then collected into one body or
streamed as server-sent events. A client that goes away has its choices aborted; a shutdown ends
them with an answer all the same (a 503, or a stream that closes with its finish reason and [DONE])."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from inferlab.allocation import OutOfKVMemoryError
from inferlab.async_engine import AsyncEngine, EngineStopping
from inferlab.inputs import truncated
from inferlab.outputs import RequestOutput
from inferlab.sampler import NoTokenLeft
from inferlab.server import openai_format as fmt
from inferlab.server.protocol import SamplingFields

Streams = list[AsyncIterator[RequestOutput]]


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def check_model(name: str | None, served: str) -> None:
    """A body's `model` must be the one served (or left out)."""
    if name is not None and name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}", "not_found_error",
                       "model_not_found")


SHUTTING_DOWN = (503, "the server is shutting down; the request was not finished", "server_error",
                 "server_shutting_down")


def failure(err: str) -> tuple[int, str, str]:
    """(status, message, type) of a request the engine failed: its own rules' fault (a 400), or the
    engine's (a 500)."""
    if err.startswith(NoTokenLeft.__name__):
        return 400, err.split(": ", 1)[1], "invalid_request_error"
    return 500, f"the engine failed on this request: {err}", "server_error"


async def start(engine: AsyncEngine, req: SamplingFields, prompts: list[dict], max_tokens: int | None,
                num_logprobs: int | None) -> tuple[str, list[str], Streams]:
    """Validate and add n requests per prompt, in one pass between engine steps; all or none are added."""
    base, max_model_len = uuid.uuid4().hex, engine.engine.max_request_tokens
    choices = []
    try:
        params = req.sampling_params(max_tokens, num_logprobs)  # once: a structured output's grammar is compiled
        for i, prompt in enumerate(prompts):
            if params.truncate_prompt_tokens is not None:  # (as the engine cuts it, before it is measured)
                prompt = {**prompt, "prompt_token_ids": truncated(prompt["prompt_token_ids"],
                                                                  params.truncate_prompt_tokens,
                                                                  engine.engine.max_request_tokens)}
            n_prompt = len(prompt["prompt_token_ids"])
            if max_tokens is not None and n_prompt + max_tokens > max_model_len:
                if getattr(req, "prompt_only", False):
                    raise ValueError(f"this model's maximum context length is {max_model_len} tokens, and {n_prompt} "
                                     "prompt tokens leave no room for the one token an echo with max_tokens 0 still "
                                     "computes (and leaves out)")
                raise ValueError(f"this model's maximum context length is {max_model_len} tokens, but {n_prompt} "
                                 f"prompt token{'s' if n_prompt != 1 else ''} + max_tokens {max_tokens} exceed it")
            choices += [(f"{base}-{i}-{j}", prompt, params.fork(j), req.priority) for j in range(req.n)]
        streams = await engine.add_many(choices)
    except OutOfKVMemoryError as e:  # kv_allocation="reserve"
        bm = engine.engine.block_manager  # what all its choices reserve together (prompt + max_tokens each)
        whole = sum(bm.blocks_needed(min(len(p["prompt_token_ids"]) + (max_tokens or max_model_len), max_model_len))
                    for _, p, *_ in choices)
        if whole <= bm.num_blocks:  # others' reservations refuse it, for now: a 503, which clients retry
            raise APIError(503, str(e), "server_error", "out_of_kv_memory") from None
        raise APIError(400, f"out of KV memory: this request's {len(choices)} choices reserve {whole} blocks "
                            f"together, more than the pool's {bm.num_blocks}; lower n or max_tokens") from None
    except (ValueError, EngineStopping) as e:
        raise APIError(*SHUTTING_DOWN) if isinstance(e, EngineStopping) else APIError(400, str(e)) from None
    return base, [rid for rid, *_ in choices], streams


async def off_loop(body: Callable[[], dict]) -> JSONResponse:
    """A whole answer built and serialized on a worker thread: n choices with their logprobs (megabytes
    of JSON) built on the event loop held every other stream and /health meanwhile."""
    return await asyncio.to_thread(lambda: JSONResponse(body()))


def abort_all(engine: AsyncEngine, rids: list[str]) -> None:
    """Abort whatever is still live among `rids` (finished ones are already gone: a no-op)."""
    for rid in rids:
        engine.abort(rid)


def streaming(engine: AsyncEngine, events: AsyncIterator[str], rids: list[str]) -> StreamingResponse:
    # The background task also covers a client that vanished before the stream even started.
    return StreamingResponse(events, media_type="text/event-stream",
                             background=BackgroundTask(abort_all, engine, rids))


async def collect(engine: AsyncEngine, raw: Request, rids: list[str], streams: Streams) -> list[RequestOutput]:
    """Run every stream to its end; if the client disconnects first, abort them all. An engine
    failure is a 500, an abort by a shutdown a 503."""
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.5)
            if await raw.is_disconnected():
                # Nobody reads this answer; an ordinary error response (nginx's 499) keeps
                # uvicorn from logging a disconnect as "Exception in ASGI application".
                raise APIError(499, "the client closed the connection")
        finals = [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        abort_all(engine, rids)
    err = next((o.error for o in finals if o.error), None)
    if err is not None:
        raise APIError(*failure(err))
    if engine.stopping and any(fmt.finish_reason(o) == "abort" for o in finals):
        raise APIError(*SHUTTING_DOWN)
    return finals


async def merged(streams: Streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as their outputs arrive, tagged with the choice index."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        async for out in stream:
            await q.put((i, out))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, out = await q.get()
                yield i, out
                if out.finished:
                    break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def sse_events(req: SamplingFields, streams: Streams, head: dict,
                     choice: Callable[[int, RequestOutput], dict | None],
                     usage: Callable[[list[RequestOutput], int], dict]) -> AsyncIterator[str]:
    """The SSE body of both endpoints: a chunk per choice update (`choice` builds it, or None
    to skip), an error event if the engine failed a request, the usage chunk if asked (and each
    chunk's choice's usage so far with vLLM's continuous_usage_stats), [DONE]."""
    finals: dict[int, RequestOutput] = {}
    started: set[int] = set()
    async for i, out in merged(streams):
        if out.error:
            status, message, kind = failure(out.error)
            yield fmt.sse({"error": {"message": message, "type": kind, "code": status}})
            break
        body = choice(i, out)
        if body is not None:
            ids = req.token_ids(out, new=True)
            prompt = {"prompt_token_ids": ids.pop("prompt_token_ids")} if ids else {}
            prompt = prompt if i not in started else {}
            started.add(i)  # the prompt's ids come with a choice's first chunk: in it, or on chat beside it
            chat = head.get("object") == "chat.completion.chunk"
            yield fmt.sse({**head, **(prompt if chat else {}), "choices": [{**body, **ids, **({} if chat else prompt)}],
                           "usage": usage([out], 1) if req.continuous_usage else None})
        if out.finished:
            finals[i] = out
    if req.include_usage and len(finals) == len(streams):
        yield fmt.sse({**head, "choices": [], "usage": usage([finals[i] for i in sorted(finals)], req.n)})
    yield fmt.sse("[DONE]")
