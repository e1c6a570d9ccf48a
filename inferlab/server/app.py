"""The HTTP routes: /v1/completions and /v1/chat/completions here; /v1/models, /health, /metrics,
/version, vLLM's /tokenize and /detokenize (`info.py`); /v1/embeddings (`embeddings.py`);
/v1/responses (`responses.py`); /classify, /score and /rerank (`scoring.py`); and Ollama's /api/*
(`ollama.py`).

Every client mistake is a 4xx with an OpenAI-style JSON error; a 500 means the server failed.
"""
from __future__ import annotations

import functools
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from inferlab.async_engine import AsyncEngine
from inferlab.outputs import RequestOutput
from inferlab.server import openai_format as fmt
from inferlab.server.embeddings import mount_embeddings
from inferlab.server.info import mount_info
from inferlab.server.ollama import mount_ollama
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from inferlab.server.reasoning import PARSERS as REASONING
from inferlab.server.reasoning import ReasoningStream
from inferlab.server.responses import mount_responses
from inferlab.server.scoring import mount_scoring
from inferlab.server.streams import APIError, check_model, collect, off_loop, sse_events, start, streaming

MAX_N = 64
MAX_CHOICES = 2048  # prompts x n in one completion request


def _union_branch(part: object) -> bool:
    """Whether a validation error's location part names a union's branch ("str", "list[ContentPart]"),
    which pydantic puts between the field and the input's own path, not a field or a key."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def build_app(engine: AsyncEngine, model_name: str, prompt_tokens_details: bool = False,
              tool_parser: str | None = None, reasoning_parser: str | None = None) -> FastAPI:
    """`prompt_tokens_details`: usage says how many prompt tokens were cached (see `fmt.usage`);
    `tool_parser`: how the model writes tool calls, which tool_choice "auto" needs (tools.py);
    `reasoning_parser`: how it writes its reasoning, given apart from the content (reasoning.py)."""
    thinks = REASONING[reasoning_parser] if reasoning_parser else None
    tok = engine.engine.tokenizer
    usage = functools.partial(fmt.usage, details=prompt_tokens_details)
    max_model_len = engine.engine.max_request_tokens  # the context, or the whole KV pool where it holds less
    prompts = PromptBuilder(tok, max_model_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="InferLab", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return fmt.error_response(400, f"the request body is not valid JSON: {reason}")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "string_unicode":  # pydantic cannot take a lone surrogate: a key holds one
            return fmt.error_response(400, f"{where or 'a key of the body'}: a lone surrogate (an escaped "
                                      "\\ud800-\\udfff alone) is not text")
        if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: missing, or not an object
            return fmt.error_response(400, "the request body must be a JSON object (sent with Content-Type: "
                                      "application/json)" if first.get("type") != "missing" else
                                      "the request body is empty: send a JSON object")
        best = max(exc.errors(), key=lambda e: len(e.get("loc", ())))  # a union's branch the input went into
        where = ".".join(str(x) for x in best.get("loc", ()) if x != "body" and not _union_branch(x))
        return fmt.error_response(400, f"{where}: {best.get('msg')}" if where else str(best.get("msg")))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return fmt.error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return fmt.error_response(exc.status_code, str(exc.detail), kind)

    mount_info(app, engine, model_name, prompts)

    def check_common(req: SamplingFields) -> None:
        check_model(req.model, model_name)
        if not 1 <= req.n <= min(MAX_N, engine.engine.config.max_num_seqs):
            raise APIError(400, f"n must be between 1 and {min(MAX_N, engine.engine.config.max_num_seqs)}")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true")
        try:
            req.refuse_unsupported()
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_common(req)
        try:
            listed = req.prompts()
            if len(listed) * req.n > MAX_CHOICES:  # each is a request: one small body could queue 64,000
                raise ValueError(f"{len(listed)} prompts x n {req.n} ask for {len(listed) * req.n} choices, more "
                                 f"than the {MAX_CHOICES} one request may; send them in several requests")
            engine_prompts = [await (prompts.fill(p, req.suffix, req.cache_salt) if req.suffix else
                                     prompts.completion(p, req.cache_salt)) for p in listed]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        base, rids, streams = await start(engine, req, engine_prompts, 1 if req.prompt_only else req.max_tokens,
                                          req.logprobs)
        if req.prompt_only:
            streams = [fmt.each(fmt.without_answer, s) for s in streams]
        head = {"id": f"cmpl-{base}", "object": "text_completion", "created": int(time.time()), "model": model_name}
        echo = fmt.Echo(tok, req.logprobs) if req.echo else None

        def first_part(out: RequestOutput, text: str, lps: dict | None, first: bool) -> dict:
            """A choice's text and logprobs (echoed after the prompt's), and its prompt's logprobs first."""
            text, lps = echo(out, text, lps, first) if echo else (text, lps)
            scored = {"prompt_logprobs": fmt.prompt_logprobs(tok, out)} if first and req.prompt_logprobs is not None \
                else {}
            return {"text": text, "logprobs": lps, **scored}

        def logprobs(out: RequestOutput, count: int, where: fmt.TextOffsets, whole: bool) -> dict | None:
            if req.logprobs is None:
                return None
            entries = fmt.new_logprobs(out, count)
            offsets = where.take([t for t, _ in entries], len(out.outputs[0].text) if whole else None)
            return fmt.completion_logprobs(tok, entries, req.logprobs, offsets)

        if not req.stream:
            finals = await collect(engine, raw, rids, streams)

            def body() -> dict:
                choices = [{"index": i, **first_part(o, o.outputs[0].text, logprobs(
                                o, len(o.outputs[0].token_ids), fmt.TextOffsets(tok, o.prompt_token_ids), True), True),
                            "finish_reason": fmt.finish_reason(o), "stop_reason": o.outputs[0].stop_reason,
                            **req.token_ids(o)} for i, o in enumerate(finals)]
                return {**head, "choices": choices, "usage": usage(finals, req.n)}
            return await off_loop(body)

        offsets = [fmt.TextOffsets(tok, p["prompt_token_ids"]) for p in engine_prompts for _ in range(req.n)]
        started = [False] * len(offsets)

        def choice(i: int, out: RequestOutput) -> dict | None:
            c = out.outputs[0]
            lp = logprobs(out, len(c.new_token_ids), offsets[i], False)
            if not (c.new_text or out.finished or lp or (not started[i] and (echo or req.prompt_logprobs is not None))):
                return None
            part, started[i] = first_part(out, c.new_text, lp, not started[i]), True
            return {"index": i, **part, "finish_reason": fmt.finish_reason(out), "stop_reason": c.stop_reason}

        return streaming(engine, sse_events(req, streams, head, choice, usage), rids)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_common(req)
        try:
            num_logprobs = req.num_logprobs()
            plan = req.tool_plan(tool_parser)
            kwargs = req.chat_template_kwargs
            if plan.template_tools() is not None:  # (vLLM's way: the template writes them into the prompt)
                kwargs = {**(kwargs or {}), "tools": plan.template_tools()}
            prompt = await prompts.chat(req.template_messages(), req.add_generation_prompt,
                                        req.continue_final_message, kwargs, req.cache_salt)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.max_completion_tokens is not None and req.max_completion_tokens < 1:  # name the field sent
            raise APIError(400, f"max_completion_tokens must be an integer >= 1, got {req.max_completion_tokens}")
        base, rids, streams = await start(engine, req, [prompt], max_tokens, num_logprobs)
        head = {"id": f"chatcmpl-{base}", "created": int(time.time()), "model": model_name}

        def logprobs(out: RequestOutput, count: int) -> dict | None:
            if num_logprobs is None:
                return None
            return fmt.chat_logprobs(tok, fmt.new_logprobs(out, count), num_logprobs)

        def choice_whole(i: int, out: RequestOutput) -> dict:
            reasoning, text = thinks.split(out.outputs[0].text) if thinks else (None, out.outputs[0].text)
            content, calls = plan.message(text)
            return {"index": i, "message": {"role": "assistant", "content": content,
                                            **({"reasoning_content": reasoning} if thinks else {}),
                                            **({"tool_calls": calls} if calls else {})},
                    "logprobs": logprobs(out, len(out.outputs[0].token_ids)),
                    "finish_reason": plan.finish_reason(fmt.finish_reason(out), calls),
                    "stop_reason": out.outputs[0].stop_reason,
                    **{k: v for k, v in req.token_ids(out).items() if k == "token_ids"}}

        if not req.stream:
            finals = await collect(engine, raw, rids, streams)

            def body() -> dict:
                choices = [choice_whole(i, o) for i, o in enumerate(finals)]
                scored = {"prompt_logprobs": fmt.prompt_logprobs(tok, finals[0])} if req.prompt_logprobs is not None \
                    else {}  # one prompt for every choice: vLLM's place for them is the response's top level
                prompt = {"prompt_token_ids": finals[0].prompt_token_ids} if req.return_token_ids else {}
                return {**head, "object": "chat.completion", "choices": choices, "usage": usage(finals, req.n),
                        **scored, **prompt}
            return await off_loop(body)

        chunk = {**head, "object": "chat.completion.chunk"}

        opened: set[int] = set()
        deltas = [plan.stream() for _ in range(req.n)]
        thinking = [ReasoningStream(thinks) for _ in range(req.n)] if thinks else None

        def choice(i: int, out: RequestOutput) -> dict | None:
            # The assistant role opens each choice's first chunk, sent with its first token (as
            # vLLM does): a chunk before any work would make clients time the first token too early.
            c, delta = out.outputs[0], {} if i in opened else {"role": "assistant"}
            opened.add(i)
            lp = logprobs(out, len(c.new_token_ids))
            if thinking:  # the reasoning apart; tool calls are read from the content alone
                reasoned, text, new = thinking[i].step(c.text, out.finished)
                part = {**({"reasoning_content": reasoned} if reasoned else {}),
                        **deltas[i].delta(new, text, out.finished)}
            else:
                part = deltas[i].delta(c.new_text, c.text, out.finished)
            if not (part or out.finished or lp or delta):
                return None
            if delta and not part:
                part = {"content": ""}
            return {"index": i, "delta": {**delta, **part}, "logprobs": lp,
                    "finish_reason": plan.finish_reason(fmt.finish_reason(out), part.get("tool_calls")),
                    "stop_reason": c.stop_reason}

        return streaming(engine, sse_events(req, streams, chunk, choice, usage), rids)

    mount_embeddings(app, engine, model_name, prompts)
    mount_scoring(app, engine, model_name, prompts)
    mount_responses(app, engine, model_name, prompts, tool_parser, thinks)
    mount_ollama(app, engine, model_name, prompts, tool_parser, thinks)
    return app
