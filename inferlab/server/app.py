"""The HTTP routes: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Every client mistake is a 4xx with an OpenAI-style JSON error; a 500 means the server failed.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from inferlab.async_engine import AsyncEngine
from inferlab.outputs import RequestOutput
from inferlab.server import openai_format as fmt
from inferlab.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

MAX_N = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def build_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    tok = engine.engine.tokenizer
    max_model_len = engine.engine.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="InferLab", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "inferlab", "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(engine.snapshot, model_name),
                                 media_type="text/plain; version=0.0.4")

    def check_common(req: SamplingFields) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model_not_found")
        if not 1 <= req.n <= min(MAX_N, engine.engine.config.max_num_seqs):
            raise APIError(400, f"n must be between 1 and {min(MAX_N, engine.engine.config.max_num_seqs)}")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true")

    def engine_prompt(p: str | dict, salt: str | None) -> dict:
        ids = p["prompt_token_ids"] if isinstance(p, dict) else tok.encode(p)
        return {"prompt": None if isinstance(p, dict) else p, "prompt_token_ids": ids, "cache_salt": salt}

    async def start(req: SamplingFields, prompts: list[dict], max_tokens: int | None,
                    num_logprobs: int | None) -> tuple[str, list[str], list[AsyncIterator[RequestOutput]]]:
        """Validate and add n requests per prompt; all or none are added."""
        base = uuid.uuid4().hex
        added: list[str] = []
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                n_prompt = len(prompt["prompt_token_ids"])
                if max_tokens is not None and n_prompt + max_tokens > max_model_len:
                    raise ValueError(f"this model's maximum context length is {max_model_len} tokens, but "
                                     f"{n_prompt} prompt tokens + max_tokens {max_tokens} exceed it")
                for j in range(req.n):
                    params = req.sampling_params(max_tokens, num_logprobs)
                    if req.seed is not None:
                        params.seed = req.seed + j  # n choices with one seed: distinct yet reproducible
                    rid = f"{base}-{i}-{j}"
                    streams.append(await engine.add(rid, prompt, params, req.priority))
                    added.append(rid)
        except ValueError as e:
            for rid in added:
                engine.abort(rid)
            raise APIError(400, str(e)) from None
        return base, added, streams

    def abort_all(rids: list[str]) -> None:
        """Abort whatever is still live among `rids` (finished ones are already gone: a no-op)."""
        for rid in rids:
            engine.abort(rid)

    def streaming(events: AsyncIterator[str], rids: list[str]) -> StreamingResponse:
        # The background task also covers a client that vanished before the stream even started.
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(abort_all, rids))

    async def collect(raw: Request, rids: list[str], streams: list[AsyncIterator[RequestOutput]]
                      ) -> list[RequestOutput]:
        """Run every stream to its end; if the client disconnects first, abort them all."""
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
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            abort_all(rids)

    async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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

    async def sse_events(req: SamplingFields, streams: list[AsyncIterator[RequestOutput]], head: dict,
                         choice: Callable[[int, RequestOutput], dict | None]) -> AsyncIterator[str]:
        """The SSE body of both endpoints: a chunk per choice update (`choice` builds it, or None
        to skip), an error event if the engine failed a request, the usage chunk if asked, [DONE]."""
        finals: dict[int, RequestOutput] = {}
        async for i, out in merged(streams):
            if out.error:
                yield fmt.sse({"error": {"message": out.error, "type": "server_error"}})
                break
            body = choice(i, out)
            if body is not None:
                yield fmt.sse({**head, "choices": [body], "usage": None})
            if out.finished:
                finals[i] = out
        if req.include_usage and len(finals) == len(streams):
            yield fmt.sse({**head, "choices": [], "usage": fmt.usage([finals[i] for i in sorted(finals)], req.n)})
        yield fmt.sse("[DONE]")

    def failed(finals: list[RequestOutput]) -> None:
        err = next((o.error for o in finals if o.error), None)
        if err is not None:
            raise APIError(500, f"the engine failed on this request: {err}", "server_error")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_common(req)
        if req.echo:  # ignoring it would silently return other text than the client asked for
            raise APIError(400, "echo is not supported")
        try:
            prompts = [engine_prompt(p, req.cache_salt) for p in req.prompts()]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        base, rids, streams = await start(req, prompts, req.max_tokens, req.logprobs)
        head = {"id": f"cmpl-{base}", "object": "text_completion", "created": int(time.time()), "model": model_name}

        def logprobs(out: RequestOutput, count: int, offset: int) -> dict | None:
            if req.logprobs is None:
                return None
            return fmt.completion_logprobs(tok, fmt.new_logprobs(out, count), req.logprobs, offset)

        if not req.stream:
            finals = await collect(raw, rids, streams)
            failed(finals)
            choices = [{"index": i, "text": o.outputs[0].text, "finish_reason": fmt.finish_reason(o),
                        "logprobs": logprobs(o, len(o.outputs[0].token_ids), 0)} for i, o in enumerate(finals)]
            return {**head, "choices": choices, "usage": fmt.usage(finals, req.n)}

        offsets = [0] * len(streams)  # text_offset of each choice's next token

        def choice(i: int, out: RequestOutput) -> dict | None:
            c = out.outputs[0]
            lp = logprobs(out, len(c.new_token_ids), offsets[i])
            offsets[i] += len(c.new_text)
            if not (c.new_text or out.finished or lp):
                return None
            return {"index": i, "text": c.new_text, "logprobs": lp, "finish_reason": fmt.finish_reason(out)}

        events = sse_events(req, streams, head, choice)
        return streaming(events, rids)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_common(req)
        try:
            text = tok.apply_chat_template(req.template_messages(), req.add_generation_prompt)
            prompt = {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False),
                      "cache_salt": req.cache_salt}
            num_logprobs = req.num_logprobs()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        base, rids, streams = await start(req, [prompt], max_tokens, num_logprobs)
        head = {"id": f"chatcmpl-{base}", "created": int(time.time()), "model": model_name}

        def logprobs(out: RequestOutput, count: int) -> dict | None:
            if num_logprobs is None:
                return None
            return fmt.chat_logprobs(tok, fmt.new_logprobs(out, count), num_logprobs)

        if not req.stream:
            finals = await collect(raw, rids, streams)
            failed(finals)
            choices = [{"index": i, "message": {"role": "assistant", "content": o.outputs[0].text},
                        "logprobs": logprobs(o, len(o.outputs[0].token_ids)),
                        "finish_reason": fmt.finish_reason(o)} for i, o in enumerate(finals)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": fmt.usage(finals, req.n)}

        chunk = {**head, "object": "chat.completion.chunk"}

        def choice(i: int, out: RequestOutput) -> dict | None:
            c = out.outputs[0]
            lp = logprobs(out, len(c.new_token_ids))
            if not (c.new_text or out.finished or lp):
                return None
            return {"index": i, "delta": {"content": c.new_text} if c.new_text else {}, "logprobs": lp,
                    "finish_reason": fmt.finish_reason(out)}

        async def events() -> AsyncIterator[str]:
            for i in range(len(streams)):  # OpenAI opens each choice with the assistant role
                yield fmt.sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}], "usage": None})
            async for event in sse_events(req, streams, chunk, choice):
                yield event
        return streaming(events(), rids)

    return app
