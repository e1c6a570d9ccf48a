"""OpenAI's Responses API, POST /v1/responses (as vLLM serves it): `input` (a text, or messages whose
content is text or input_text parts) after the `instructions`, through the chat template; one
answer, as one output message of output_text, whole or streamed as the API's typed events
(response.created ... response.output_text.delta ... response.completed). `text.format` asks for
JSON (a structured output). Nothing is stored, so `previous_response_id` is refused, and so are
tools, which this route does not run yet (chat completions does)."""
from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from inferlab.async_engine import AsyncEngine
from inferlab.outputs import RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.server.constraints import response_format_constraint
from inferlab.server.messages import MAX_MESSAGES
from inferlab.server.prompts import PromptBuilder
from inferlab.server.protocol import Float, Int
from inferlab.server.streams import APIError, check_model, collect, merged, start, streaming
from inferlab.structured.params import StructuredOutputsParams


class Part(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[Part]

    def as_chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # include, metadata's like, service_tier: change nothing here

    model: StrictStr | None = None
    input: StrictStr | list[Message] = Field(max_length=MAX_MESSAGES)
    instructions: StrictStr | None = None
    max_output_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    seed: Int | None = None
    stream: StrictBool = False
    store: StrictBool | None = None  # nothing is stored: the answer says store false
    previous_response_id: StrictStr | None = None
    tools: list[Any] | None = None
    text: dict[StrictStr, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    metadata: dict[StrictStr, StrictStr] | None = None
    # what streams.start reads of a request: one answer, at the default priority
    n: ClassVar[int] = 1
    priority: ClassVar[int] = 0

    def check(self) -> None:
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                                "conversation in input")
        if self.tools:
            raise APIError(400, "tools are not supported on /v1/responses yet; /v1/chat/completions runs them")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be an integer >= 1, got {self.max_output_tokens}")

    def messages(self) -> list[dict]:
        given = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else \
            [m.as_chat() for m in self.input]
        if not given:
            raise APIError(400, "input is empty: send a text or messages")
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + given

    def format(self) -> dict:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict):
            raise APIError(400, f"text.format must be an object, got {fmt!r}")
        return fmt

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        fmt = self.format()  # the Responses API's json_schema carries its schema at the format's top level
        try:
            fields = response_format_constraint({"type": fmt.get("type"), "json_schema": fmt})
            structured = StructuredOutputsParams(**fields) if fields else None
        except ValueError as e:
            raise ValueError(f"text.format: {str(e).removeprefix('response_format ')}") from None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                              structured_outputs=structured)


def mount_responses(app: FastAPI, engine: AsyncEngine, model_name: str, prompts: PromptBuilder) -> None:
    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request):
        check_model(req.model, model_name)
        req.check()
        try:  # (a text.format that cannot be is refused by `start`, before anything is added)
            prompt = await prompts.chat(req.messages(), True, False, None, None)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        base, rids, streams = await start(engine, req, [prompt], req.max_output_tokens, None)
        ids = {"id": f"resp_{base}", "item": f"msg_{base}"}
        if not req.stream:
            return body(req, model_name, ids, (await collect(engine, raw, rids, streams))[0])
        return streaming(engine, events(req, model_name, ids, streams), rids)


def body(req: ResponsesRequest, model: str, ids: dict, out: RequestOutput | None) -> dict:
    """The response object: in progress (out None), or finished with its one output message."""
    done = out is not None and out.finished
    status = "in_progress" if not done else "incomplete" if out.outputs[0].finish_reason == "length" else "completed"
    used = {} if out is None else {"usage": {
        "input_tokens": len(out.prompt_token_ids), "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
        "output_tokens": len(out.outputs[0].token_ids), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(out.prompt_token_ids) + len(out.outputs[0].token_ids)}}
    return {"id": ids["id"], "object": "response", "created_at": int(time.time()), "status": status, "model": model,
            "output": [message(ids, out.outputs[0].text)] if done else [], "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "text": {"format": req.format()}, "truncation": "disabled", "store": False,
            "previous_response_id": None, "reasoning": None, "metadata": req.metadata or {}, **used}


def message(ids: dict, text: str, status: str = "completed") -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": ids["item"], "status": status, "role": "assistant", "content": content}


async def events(req: ResponsesRequest, model: str, ids: dict, streams) -> Any:
    """The API's typed events, as server-sent events with their `event:` names."""
    seq = iter(range(1 << 62))

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    where = {"item_id": ids["item"], "output_index": 0, "content_index": 0}
    yield event("response.created", response=body(req, model, ids, None))
    yield event("response.in_progress", response=body(req, model, ids, None))
    yield event("response.output_item.added", output_index=0, item=message(ids, "", "in_progress"))
    yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
    async for _, out in merged(streams):
        if out.error:
            yield event("error", code="server_error", message=out.error, param=None)
            return
        if out.outputs[0].new_text:
            yield event("response.output_text.delta", **where, delta=out.outputs[0].new_text, logprobs=[])
        if out.finished:
            text = out.outputs[0].text
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part={"type": "output_text", "text": text,
                                                                      "annotations": []})
            yield event("response.output_item.done", output_index=0, item=message(ids, text))
            final = body(req, model, ids, out)
            yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                        response=final)
