"""Ollama's native API on the same engine: /api/generate, /api/chat, /api/embed (and the older
/api/embeddings), /api/tags, /api/show, /api/ps and /api/version, so Ollama's clients (its Python and
JavaScript libraries, Open WebUI...) talk to InferLab unchanged. A request becomes one engine request
through the OpenAI endpoints' path (`streams.start`; an embedding, `embeddings.pool`); its answer
streams as Ollama's newline-delimited JSON, or comes whole with `"stream": false`.

As Ollama does, `num_predict` caps the answer at the room the prompt leaves, a prompt longer than
the context loses its middle (its first `num_keep` tokens stay), and a conversation longer than the
context loses its oldest exchanges (its system messages stay). Errors are Ollama's
`{"error": "..."}`, also for the routes of Ollama's that are not served (pulling or creating models);
the routes stay out of the OpenAPI document, which declares OpenAI's shapes. What a body may hold is
`ollama_protocol.py`'s."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from inferlab import __version__
from inferlab.async_engine import AsyncEngine
from inferlab.model.layers.quant import describe_weights
from inferlab.outputs import RequestOutput
from inferlab.server.embeddings import mount_ollama_embed
from inferlab.server.ollama_protocol import Ask, OllamaRequest
from inferlab.server.prompts import PromptBuilder
from inferlab.server.reasoning import ReasoningParser, ReasoningStream
from inferlab.server.streams import APIError, abort_all, collect, merged, start
from inferlab.server.tools import Tool, ToolPlan


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _final(out: RequestOutput) -> dict:
    """The closing object's counts and times (nanoseconds, as Ollama gives them)."""
    m, ns = out.metrics, 1e9
    first = m.first_token_time or m.finished_time or m.arrival_time
    end = m.finished_time or first
    reason = out.outputs[0].finish_reason
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": int((end - m.arrival_time) * ns), "load_duration": 0,
            "prompt_eval_count": len(out.prompt_token_ids),
            "prompt_eval_duration": int((first - (m.first_scheduled_time or first)) * ns),
            "eval_count": len(out.outputs[0].token_ids), "eval_duration": int((end - first) * ns)}


def _line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # (nested 1,000 deep, a RecursionError was a 500)
        raise APIError(400, f"the request body is not JSON: {str(e)[:120]}") from None


def fitted(tok, messages: list[dict], limit: int, answer: int, max_chars: int, kwargs: dict | None = None) -> dict:
    """The chat prompt of `messages` that leaves `answer` tokens of `limit`: the oldest messages after
    the leading system ones are left out, as few as will do (a binary search: templating 10,000
    messages once per message dropped took minutes). Those whose text alone is past `max_chars` (more
    than the context can hold) go before any tokenizing. Refused if the last message alone does not fit."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    chars = sum(len(m["content"]) for m in messages)
    low = 0
    while chars > max_chars and first + low < len(messages) - 1:
        chars -= len(messages[first + low]["content"])
        low += 1
    cont = messages[-1]["role"] == "assistant"  # Ollama continues a last assistant message

    def prompt(dropped: int) -> dict:
        text = tok.apply_chat_template(messages[:first] + messages[first + dropped:], not cont, cont, kwargs)
        return {"prompt": text, "prompt_token_ids": tok.encode_chat(text), "cache_salt": None}

    best, most = prompt(low), len(messages) - first - 1  # at most all but the last message go
    if len(best["prompt_token_ids"]) + answer <= limit:
        return best
    if low < most:
        low, high = low + 1, most
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if len(prompt(mid)["prompt_token_ids"]) + answer <= limit else (mid + 1, high)
        best = prompt(low)
    if len(best["prompt_token_ids"]) + answer > limit:
        raise ValueError(f"the last message with the system ones takes {len(best['prompt_token_ids'])} tokens: no "
                         f"room for an answer in this model's context of {limit} tokens")
    return best


def shortened(prompt: dict, limit: int, answer: int, keep: int) -> dict:
    """A prompt too long to leave `answer` of the context's `limit` tokens cut as Ollama's runner cuts
    it: its first `keep` tokens (`num_keep`) and as many of its last as fit; the middle goes."""
    ids, room = prompt["prompt_token_ids"], limit - answer
    if len(ids) <= room:
        return prompt
    keep = min(keep, room - 1)
    return {**prompt, "prompt": None, "prompt_token_ids": ids[:keep] + ids[len(ids) - (room - keep):]}


def tool_message(content: str | None, calls: list[dict]) -> dict:
    """An answer's text and the calls the server's tool-call parser read in it (`ToolPlan.message`)
    as Ollama's message: the calls' arguments as objects."""
    return {"role": "assistant", "content": content or "", **({"tool_calls": [
        {"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in calls]} if calls else {})}


def mount_ollama(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder,
                 tool_parser: str | None = None, thinks: ReasoningParser | None = None) -> None:
    """`tool_parser`: how the model writes tool calls (tools.py), which a chat with tools needs;
    `thinks`: how it writes its reasoning, which a chat answers as `message.thinking` (reasoning.py)."""
    core, tok = engine.engine, engine.engine.tokenizer
    args, limit = core.model.args, core.max_request_tokens
    names = {model_name.lower(), f"{model_name}:latest".lower()}  # Ollama's clients add the default tag
    path = core.config.model
    kept = describe_weights(core.model)  # its weight types, most bytes first: 'q4_1t16 63.3 MiB (120), ...'
    details = {"parent_model": "", "format": "gguf" if path is None or path.endswith(".gguf") else "safetensors",
               "family": args.arch, "families": [args.arch], "parameter_size": "",
               "quantization_level": re.sub(r"[tx]16$", "", kept.split(" ")[0]).upper()}
    size = int(sum(float(mib) for mib in re.findall(r" ([\d.]+) MiB", kept)) * 2**20)
    listed = {"name": model_name, "model": model_name, "modified_at": _now(), "size": size, "digest": "",
              "details": details}

    def check_model(name: Any) -> None:
        if not isinstance(name, str) or name.lower() not in names:
            raise APIError(404, f"model {name!r} not found; this server serves {model_name!r}")

    async def read(raw: Request) -> OllamaRequest:
        try:
            req = OllamaRequest.model_validate(_body(await raw.body()))
        except ValidationError as e:
            first = e.errors()[0]
            if not first["loc"]:
                raise APIError(400, "the request body must be a JSON object") from None
            raise APIError(400, f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        check_model(req.model)
        try:
            req.refuse_unsupported()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return req

    async def answer(raw: Request, req: OllamaRequest, prompt: dict, key: str, wrap: Callable[[str], Any],
                     plan: ToolPlan | None = None) -> JSONResponse | StreamingResponse:
        try:
            max_tokens = req.max_tokens(limit - len(prompt["prompt_token_ids"]))
            _, rids, streams = await start(engine, Ask(req), [prompt], max_tokens, None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        head = {"model": req.model}
        reasons = thinks if key == "message" else None  # a chat's reasoning apart from its content
        if not req.stream:
            out = (await collect(engine, raw, rids, streams))[0]
            reasoning, text = reasons.split(out.outputs[0].text) if reasons else ("", out.outputs[0].text)
            said = tool_message(*plan.message(text)) if plan else wrap(text)
            said = {**said, "thinking": reasoning} if reasoning else said
            return JSONResponse({**head, "created_at": _now(), key: said, **_final(out)})
        held = plan.stream() if plan else None  # text that may be a call's is held back until told apart
        thinking = ReasoningStream(reasons) if reasons else None

        async def lines() -> AsyncIterator[str]:
            async for _, out in merged(streams):
                if out.error:
                    yield _line({"error": out.error})
                    return
                c = out.outputs[0]
                reasoned, text, new = thinking.step(c.text, out.finished) if thinking else ("", c.text, c.new_text)
                new = new if held is None else held.delta(new, text, False).get("content", "")
                if new or reasoned:
                    said = {**wrap(new), "thinking": reasoned} if reasoned else wrap(new)
                    yield _line({**head, "created_at": _now(), key: said, "done": False})
                if out.finished:
                    last = wrap("")
                    if held is not None:  # the text held back, or the calls it held
                        part = held.delta("", text, True)
                        last = tool_message(part.get("content"), part.get("tool_calls", []))
                    yield _line({**head, "created_at": _now(), key: last, **_final(out)})
        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 background=BackgroundTask(abort_all, engine, rids))

    async def guarded(work) -> Any:
        try:
            return await work
        except APIError as e:  # Ollama's shape: {"error": "..."}
            return JSONResponse({"error": e.message}, status_code=e.status)

    def loaded(req: OllamaRequest, key: str, value: Any) -> dict:
        """Ollama's answer to a request with nothing to answer: it loads (or, keep_alive 0, unloads) the model."""
        return {"model": req.model, "created_at": _now(), key: value, "done": True,
                "done_reason": "unload" if req.unloads() else "load"}

    @app.post("/api/generate", include_in_schema=False)
    async def generate(raw: Request):
        async def work():
            req = await read(raw)
            if req.think:  # (false asks for none: the template is told, as on /api/chat)
                raise APIError(400, "think is read on /api/chat, whose answer gives the thinking apart")
            if not req.prompt:
                return loaded(req, "response", "")
            try:
                if req.suffix:  # code completion: the middle between the prompt and the suffix
                    prompt = await prompts.fill(req.prompt, req.suffix, None)
                elif req.raw:
                    prompt = {"prompt": req.prompt, "prompt_token_ids": await prompts.encode(req.prompt),
                              "cache_salt": None}
                else:
                    system = [{"role": "system", "content": req.system}] if req.system else []
                    prompt = await prompts.chat([*system, {"role": "user", "content": req.prompt}], True, False,
                                                None if req.think is None else {"enable_thinking": False}, None)
                room = min(req.max_tokens(limit), max(1, limit // 4))  # kept for the answer: at most a quarter
                # (a filled middle's cut keeps its first tokens: BOS and the prefix's mark)
                prompt = shortened(prompt, limit, room, max(req.num_keep(), 2) if req.suffix else req.num_keep())
            except ValueError as e:
                raise APIError(400, str(e)) from None
            return await answer(raw, req, prompt, "response", lambda text: text)
        return await guarded(work())

    @app.post("/api/chat", include_in_schema=False)
    async def chat(raw: Request):
        async def work():
            req = await read(raw)
            if not req.messages:
                return loaded(req, "message", {"role": "assistant", "content": ""})
            messages = [{"role": m.role, "content": m.content, **({"tool_calls": m.tool_calls} if m.tool_calls else {})}
                        for m in req.messages]
            try:
                plan = ToolPlan.of([Tool.model_validate(t) for t in req.tools], "auto", tool_parser) \
                    if req.tools else None  # Ollama's tools: the model decides, as tool_choice auto
                if req.think is not None and thinks is None:
                    raise ValueError("think needs the server started with --reasoning-parser (qwen3, deepseek_r1)")
                kwargs = {**({"tools": plan.template_tools()} if plan else {}),
                          **({"enable_thinking": req.think} if req.think is not None else {})}  # (Qwen3's template)
                room = min(req.max_tokens(limit), max(1, limit // 4))  # kept for the answer: at most a quarter
                prompt = await asyncio.to_thread(fitted, tok, messages, limit, room, prompts.max_chars, kwargs or None)
            except ValidationError as e:  # (a ValueError too: first)
                where = ".".join(str(x) for x in e.errors()[0]["loc"])
                raise APIError(400, f"tools.{where}: {e.errors()[0]['msg']}") from None
            except ValueError as e:
                raise APIError(400, str(e)) from None
            return await answer(raw, req, prompt, "message", lambda text: {"role": "assistant", "content": text},
                                plan)
        return await guarded(work())

    mount_ollama_embed(app, engine, prompts, read, guarded)  # /api/embed, /api/embeddings

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> PlainTextResponse:  # Ollama's CLI and some UIs check that a server is up here
        return PlainTextResponse("InferLab is running (Ollama's API under /api, OpenAI's under /v1)")

    @app.get("/api/version", include_in_schema=False)
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/api/tags", include_in_schema=False)
    async def tags() -> dict:
        return {"models": [listed]}

    @app.get("/api/ps", include_in_schema=False)
    async def ps() -> dict:
        return {"models": [{**listed, "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0, "context_length": limit}]}

    @app.post("/api/show", include_in_schema=False)
    async def show(raw: Request):
        async def work():
            body = _body(await raw.body())
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            check_model(body.get("model") or body.get("name"))
            info = {"general.architecture": args.arch, f"{args.arch}.context_length": limit,
                    f"{args.arch}.embedding_length": args.hidden_size, f"{args.arch}.block_count": args.num_layers,
                    f"{args.arch}.attention.head_count": args.num_heads,
                    f"{args.arch}.attention.head_count_kv": args.num_kv_heads, "general.vocab_size": args.vocab_size}
            return {"license": "", "modelfile": "", "parameters": "", "template": "", "details": details,
                    "model_info": info, "capabilities": ["completion", "embedding"],
                    "modified_at": listed["modified_at"]}
        return await guarded(work())

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"], include_in_schema=False)
    async def unserved(rest: str) -> JSONResponse:  # after the others: pull, create, copy, delete, push...
        return JSONResponse({"error": f"/api/{rest} is not supported by this server (it serves one model, to "
                                      "generate, chat and embed)"}, status_code=404)
