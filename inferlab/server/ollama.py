"""Ollama's native API on the same engine: /api/generate, /api/chat, /api/tags, /api/show, /api/ps and
/api/version, so Ollama's clients (its Python and JavaScript libraries, Open WebUI...) talk to InferLab
unchanged. A request becomes one engine request through the OpenAI endpoints' path (`streams.start`);
its answer streams as Ollama's newline-delimited JSON, or comes whole with `"stream": false`.

Sampling follows Ollama's defaults where a request's `options` say nothing (temperature 0.8, top_k
40, top_p 0.9, repeat_penalty 1.1), except that the repetition penalty covers the whole context (Ollama's
`repeat_last_n: -1`). Options that only tune Ollama's runtime (num_ctx, num_thread, num_gpu...) are
read and left alone; one that would change the answer and is not implemented is refused by name.
Errors are Ollama's `{"error": "..."}`; the routes stay out of the OpenAPI document, which declares
OpenAI's shapes."""
from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from starlette.background import BackgroundTask

from inferlab import __version__
from inferlab.async_engine import AsyncEngine
from inferlab.model.layers.quant import describe_weights
from inferlab.outputs import RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.server.messages import MAX_MESSAGES
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import Float, Int
from inferlab.server.streams import APIError, abort_all, collect, merged, start

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}
RUNTIME = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
           "low_vram", "num_keep", "penalize_newline", "vocab_only", "f16_kv", "logits_all",
           "mirostat_eta", "mirostat_tau"}  # (the last two tune mirostat, which stays off)
NEUTRAL = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "repeat_last_n": -1}  # anything else is refused


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    temperature: Float | None = None
    top_k: Int | None = None
    top_p: Float | None = None
    min_p: Float | None = None
    seed: Int | None = None
    num_predict: Int | None = None  # -1: until a stop or the context's end (-2, which fills it, as well)
    stop: StrictStr | list[StrictStr] | None = None
    repeat_penalty: Float | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    images: list[Any] | None = None
    tool_calls: list[dict[StrictStr, Any]] | None = None


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # keep_alive and whatever else tunes the runtime only

    model: StrictStr
    stream: StrictBool = True
    options: Options = Options()
    format: Any = None
    think: Any = None
    logprobs: StrictBool = False
    # /api/generate's
    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False
    suffix: StrictStr | None = None
    template: StrictStr | None = None
    images: list[Any] | None = None
    context: list[Any] | None = None
    # /api/chat's
    messages: list[Message] = Field(default=[], max_length=MAX_MESSAGES)
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        asked = {"format": self.format, "suffix": self.suffix, "template": self.template, "images": self.images,
                 "context": self.context, "tools": self.tools, "think": self.think, "logprobs": self.logprobs}
        for name, value in asked.items():
            if value not in (None, "", [], False):
                raise ValueError(f"{name} is not supported by this server")
        if any(m.images for m in self.messages):
            raise ValueError("images are not supported (this model reads text only)")
        for name, value in (self.options.model_extra or {}).items():
            if name in NEUTRAL and value not in (None, NEUTRAL[name]):
                raise ValueError(f"options.{name} {value!r} is not supported here" +
                                 (": the repetition penalty covers the whole context (-1)" if name == "repeat_last_n"
                                  else ""))
            if name not in NEUTRAL and name not in RUNTIME:
                raise ValueError(f"options.{name} is not an option this server knows")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        o = self.options
        given = {k: v for k, v in o.model_dump(exclude_unset=True).items() if v is not None}
        value = {**DEFAULTS, **given}.get
        stop = [o.stop] if isinstance(o.stop, str) else o.stop
        return SamplingParams(max_tokens=max_tokens, temperature=value("temperature"), top_k=value("top_k"),
                              top_p=value("top_p"), min_p=value("min_p"), repetition_penalty=value("repeat_penalty"),
                              presence_penalty=value("presence_penalty", 0.0),
                              frequency_penalty=value("frequency_penalty", 0.0), seed=o.seed, stop=stop)

    def max_tokens(self) -> int | None:
        n = self.options.num_predict
        if n is None or n in (-1, -2):
            return None
        if n < 1:
            raise ValueError(f"options.num_predict must be -1, -2 or at least 1, got {n}")
        return n


@dataclass
class _Ask:
    """What `streams.start` reads of a request: one choice, its sampling, its priority."""
    request: OllamaRequest
    n: int = 1
    priority: int = 0

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return self.request.sampling_params(max_tokens, logprobs)


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def mount_ollama(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder) -> None:
    core = engine.engine
    args = core.model.args
    names = {model_name, f"{model_name}:latest"}  # Ollama's clients add the default tag
    path = core.config.model
    kept = describe_weights(core.model)  # its weight types, most bytes first: 'q4_1t16 63.3 MiB (120), ...'
    details = {"parent_model": "", "format": "gguf" if path is None or path.endswith(".gguf") else "safetensors",
               "family": args.arch, "families": [args.arch], "parameter_size": "",
               "quantization_level": re.sub(r"[tx]16$", "", kept.split(" ")[0]).upper()}
    size = int(sum(float(mib) for mib in re.findall(r" ([\d.]+) MiB", kept)) * 2**20)
    listed = {"name": model_name, "model": model_name, "modified_at": _now(), "size": size, "digest": "",
              "details": details}

    async def read(raw: Request) -> OllamaRequest:
        try:
            req = OllamaRequest.model_validate(json.loads(await raw.body()))
        except (ValueError, UnicodeDecodeError) as e:
            errors = e.errors() if isinstance(e, ValidationError) else None
            if errors and errors[0]["loc"]:
                where = ".".join(str(x) for x in errors[0]["loc"])
                raise APIError(400, f"{where}: {errors[0]['msg']}") from None
            raise APIError(400, "the request body must be a JSON object" + ("" if errors else f": {e}")) from None
        if req.model not in names:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}")
        try:
            req.refuse_unsupported()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return req

    async def answer(raw: Request, req: OllamaRequest, prompt: dict, key: str,
                     wrap: Callable[[str], Any]) -> JSONResponse | StreamingResponse:
        try:
            _, rids, streams = await start(engine, _Ask(req), [prompt], req.max_tokens(), None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        head = {"model": req.model}
        if not req.stream:
            out = (await collect(engine, raw, rids, streams))[0]
            return JSONResponse({**head, "created_at": _now(), key: wrap(out.outputs[0].text), **_final(out)})

        async def lines() -> AsyncIterator[str]:
            async for _, out in merged(streams):
                if out.error:
                    yield _line({"error": out.error})
                    return
                if out.outputs[0].new_text:
                    yield _line({**head, "created_at": _now(), key: wrap(out.outputs[0].new_text), "done": False})
                if out.finished:
                    yield _line({**head, "created_at": _now(), key: wrap(""), **_final(out)})
        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 background=BackgroundTask(abort_all, engine, rids))

    async def guarded(work) -> Any:
        try:
            return await work
        except APIError as e:  # Ollama's shape: {"error": "..."}
            return _error(e.status, e.message)

    @app.post("/api/generate", include_in_schema=False)
    async def generate(raw: Request):
        async def work():
            req = await read(raw)
            if not req.prompt:  # Ollama's way to load a model: nothing to answer
                return {"model": req.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
            try:
                if req.raw:
                    prompt = {"prompt": req.prompt, "prompt_token_ids": await prompts.encode(req.prompt),
                              "cache_salt": None}
                else:
                    system = [{"role": "system", "content": req.system}] if req.system else []
                    prompt = await prompts.chat([*system, {"role": "user", "content": req.prompt}], True, False,
                                                None, None)
            except ValueError as e:
                raise APIError(400, str(e)) from None
            return await answer(raw, req, prompt, "response", lambda text: text)
        return await guarded(work())

    @app.post("/api/chat", include_in_schema=False)
    async def chat(raw: Request):
        async def work():
            req = await read(raw)
            if not req.messages:  # as Ollama: an empty conversation loads the model
                return {"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                        "done": True, "done_reason": "load"}
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            last_is_reply = messages[-1]["role"] == "assistant"  # Ollama continues a last assistant message
            try:
                prompt = await prompts.chat(messages, not last_is_reply, last_is_reply, None, None)
            except ValueError as e:
                raise APIError(400, str(e)) from None
            return await answer(raw, req, prompt, "message", lambda text: {"role": "assistant", "content": text})
        return await guarded(work())

    @app.get("/api/version", include_in_schema=False)
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/api/tags", include_in_schema=False)
    async def tags() -> dict:
        return {"models": [listed]}

    @app.get("/api/ps", include_in_schema=False)
    async def ps() -> dict:
        return {"models": [{**listed, "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": core.max_request_tokens}]}

    @app.post("/api/show", include_in_schema=False)
    async def show(raw: Request):
        async def work():
            try:
                body = json.loads(await raw.body())
                name = body.get("model") or body.get("name") if isinstance(body, dict) else None
            except ValueError:
                name = None
            if name not in names:
                raise APIError(404, f"model {name!r} not found; this server serves {model_name!r}")
            info = {"general.architecture": args.arch, f"{args.arch}.context_length": core.max_request_tokens,
                    f"{args.arch}.embedding_length": args.hidden_size, f"{args.arch}.block_count": args.num_layers,
                    f"{args.arch}.attention.head_count": args.num_heads,
                    f"{args.arch}.attention.head_count_kv": args.num_kv_heads, "general.vocab_size": args.vocab_size}
            return {"license": "", "modelfile": "", "parameters": "", "template": "", "details": details,
                    "model_info": info, "capabilities": ["completion"], "modified_at": listed["modified_at"]}
        return await guarded(work())

