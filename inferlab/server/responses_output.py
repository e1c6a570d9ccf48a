"""What /v1/responses answers (responses.py reads the request): the response object, whose output
items are the answer's text as one message and each tool call as a function_call item, whole or as
the API's typed events (response.created ... response.output_text.delta or
response.function_call_arguments.delta ... response.completed). A stream opens each item as its
first text or call arrives (tools.ToolStream decides which text is a call's), and the final object
holds what the stream sent."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from inferlab.outputs import RequestOutput
from inferlab.server.reasoning import ReasoningParser, ReasoningStream
from inferlab.server.streams import merged
from inferlab.server.tools import ToolPlan


@dataclass
class Answer:
    id: str
    model: str
    echoed: dict  # the request's settings, which the response object repeats
    plan: ToolPlan
    logprobs: Callable[[RequestOutput, int], list[dict]] | None = None  # an output's last n tokens', if asked
    thinks: ReasoningParser | None = None  # the server's reasoning parser: a reasoning item before the rest


def message(text: str, item_id: str, status: str = "completed", logprobs: list | None = None) -> dict:
    content = [text_part(text, logprobs)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def text_part(text: str, logprobs: list | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [],
            **({} if logprobs is None else {"logprobs": logprobs})}


def reasoning_item(text: str, item_id: str, status: str = "completed") -> dict:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def function_call(call: dict, item_id: str, status: str = "completed") -> dict:
    """A chat completion's tool call (tools.call) as a function_call item."""
    fn = call["function"]
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"] if status == "completed" else "", "status": status}


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


def output_items(plan: ToolPlan, text: str, logprobs: list | None = None,
                 thinks: ReasoningParser | None = None) -> list[dict]:
    """A finished answer's items: its reasoning (where the server reads it), its text (if any, or if
    there is nothing else) and its calls."""
    reasoning, text = thinks.split(text) if thinks else ("", text)
    content, calls = plan.message(text)
    said = [message(content or "", new_id("msg"), logprobs=logprobs)] if content or not calls else []
    return [reasoning_item(reasoning, new_id("rs"))] * bool(reasoning) + said + \
        [function_call(c, new_id("fc")) for c in calls]


def body(answer: Answer, out: RequestOutput | None, items: list[dict] | None = None) -> dict:
    """The response object: in progress (out None), or finished with its output items (`items`:
    those a stream sent; else read from the answer's text)."""
    done = out is not None and out.finished
    status = "in_progress" if not done else "incomplete" if out.outputs[0].finish_reason == "length" else "completed"
    used = {} if out is None else {"usage": {
        "input_tokens": len(out.prompt_token_ids), "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
        "output_tokens": len(out.outputs[0].token_ids), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": len(out.prompt_token_ids) + len(out.outputs[0].token_ids)}}
    if not done or items is not None:
        output = items or []
    else:
        c = out.outputs[0]
        output = output_items(answer.plan, c.text, answer.logprobs and answer.logprobs(out, len(c.token_ids)),
                              answer.thinks)
    return {"id": answer.id, "object": "response", "created_at": int(time.time()), "status": status,
            "model": answer.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **answer.echoed, "truncation": "disabled", "store": False, "previous_response_id": None,
            "reasoning": None, **used}


class Events:
    """A stream's server-sent events, numbered in order, and the output items they open and close."""

    def __init__(self) -> None:
        self.seq, self.items, self.text = 0, [], ""
        self.logprobs: list | None = None  # every token's so far, where asked, and how many a delta sent
        self.logprobs_sent = 0
        self.msg: int | None = None  # the message's output index, once its text began
        self.reasoning: int | None = None  # the reasoning item's, once it began
        self.thought = ""
        self.calls: dict[int, int] = {}  # a call's index in the answer -> its output index

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': self.seq - 1, **fields})}\n\n"

    def where(self) -> dict:
        return {"item_id": self.items[self.msg]["id"], "output_index": self.msg, "content_index": 0}

    def text_delta(self, delta: str) -> list[str]:
        sent = []
        if self.msg is None:
            self.msg = len(self.items)
            self.items.append(message("", new_id("msg"), "in_progress"))
            sent += [self.event("response.output_item.added", output_index=self.msg, item=self.items[self.msg]),
                     self.event("response.content_part.added", **self.where(), part=text_part(""))]
        self.text += delta
        new = (self.logprobs or [])[self.logprobs_sent:]
        if not delta and not (new and self.msg is not None):  # (logprobs of tokens without text: at the end)
            return sent
        self.logprobs_sent += len(new)
        return sent + [self.event("response.output_text.delta", **self.where(), delta=delta, logprobs=new)]

    def reasoning_delta(self, delta: str) -> list[str]:
        sent = []
        if self.reasoning is None:
            self.reasoning = len(self.items)
            self.items.append(reasoning_item("", new_id("rs"), "in_progress"))
            sent.append(self.event("response.output_item.added", output_index=self.reasoning,
                                   item=self.items[self.reasoning]))
        self.thought += delta
        return sent + [self.event("response.reasoning_text.delta", item_id=self.items[self.reasoning]["id"],
                                  output_index=self.reasoning, content_index=0, delta=delta)]

    def call_delta(self, part: dict) -> list[str]:
        sent = []
        if part["index"] not in self.calls:
            at = self.calls[part["index"]] = len(self.items)
            self.items.append(function_call(part, new_id("fc"), "in_progress"))
            sent.append(self.event("response.output_item.added", output_index=at, item=self.items[at]))
        at = self.calls[part["index"]]
        piece = part["function"]["arguments"]
        self.items[at]["arguments"] += piece
        return sent + [self.event("response.function_call_arguments.delta", item_id=self.items[at]["id"],
                                  output_index=at, delta=piece)] if piece else sent

    def close(self) -> list[str]:
        """Every item's closing events, in output order (reasoning that was all the answer closes before
        the empty message opens)."""
        sent = self.done(self.reasoning) if self.reasoning is not None and self.msg is None else []
        # an answer of no text and no call is still one message; tokens without text (the end token) send
        # their logprobs
        sent += self.text_delta("") if self.msg is not None or not self.calls else []
        for at in range(len(self.items)):
            sent += self.done(at) if self.items[at]["status"] != "completed" else []
        return sent

    def done(self, at: int) -> list[str]:
        """Item `at`'s closing events."""
        item, sent = self.items[at], []
        item["status"] = "completed"
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": self.thought}]
            sent.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=at,
                                   content_index=0, text=self.thought))
        elif item["type"] == "message":
            item["content"] = [text_part(self.text, self.logprobs)]
            sent += [self.event("response.output_text.done", **self.where(), text=self.text,
                                logprobs=self.logprobs or []),
                     self.event("response.content_part.done", **self.where(), part=item["content"][0])]
        else:
            sent.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                   name=item["name"], arguments=item["arguments"]))
        sent.append(self.event("response.output_item.done", output_index=at, item=item))
        return sent


async def events(answer: Answer, streams) -> AsyncIterator[str]:
    """The API's typed events, as server-sent events with their `event:` names."""
    ev, deltas = Events(), answer.plan.stream()
    thinking = ReasoningStream(answer.thinks) if answer.thinks else None
    ev.logprobs = [] if answer.logprobs else None
    yield ev.event("response.created", response=body(answer, None))
    yield ev.event("response.in_progress", response=body(answer, None))
    async for _, out in merged(streams):
        if out.error:
            yield ev.event("error", code="server_error", message=out.error, param=None)
            return
        c = out.outputs[0]
        if answer.logprobs:
            ev.logprobs += answer.logprobs(out, len(c.new_token_ids))
        reasoned, text, new = thinking.step(c.text, out.finished) if thinking else ("", c.text, c.new_text)
        for sent in (ev.reasoning_delta(reasoned) if reasoned else []):
            yield sent
        part = deltas.delta(new, text, out.finished)
        for sent in (ev.text_delta(part["content"]) if part.get("content") else []):
            yield sent
        for call in part.get("tool_calls", []):
            for sent in ev.call_delta(call):
                yield sent
        if out.finished:
            for sent in ev.close():
                yield sent
            final = body(answer, out, ev.items)
            yield ev.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                           response=final)
