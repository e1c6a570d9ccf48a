"""A chat request's messages: parsed strictly (text content only, as this server reads text), and
handed to the chat template as it reads them."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictStr


class ContentPart(BaseModel):
    """A part of a message's content. Only text parts are read; the others (image_url,
    input_audio, file) are parsed so that they can be refused by name, not as "not a string"."""
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[StrictStr, Any]] | None = None  # an assistant's: a replayed agent's history
    tool_call_id: StrictStr | None = None  # a tool's answer: to which call

    def text(self, where: str) -> str:
        if self.content is None and self.role != "assistant":  # OpenAI's: only an assistant's (tool calls) may lack it
            raise ValueError(f"{where}.content: a {self.role} message needs its content")
        if not isinstance(self.content, list):
            return self.content or ""
        if not self.content and self.role != "assistant":  # as OpenAI: an array needs one part at least
            raise ValueError(f"{where}.content: an empty array; a {self.role} message needs one part at least")
        for i, part in enumerate(self.content):
            if part.type != "text":
                raise ValueError(f"{where}.content.{i}: {part.type} content parts are not supported "
                                 "(this model reads text only)")
            if part.text is None:
                raise ValueError(f"{where}.content.{i}: a text part needs its text")
        return "".join(part.text for part in self.content)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template reads them, with a replayed conversation's names, tool calls
    and tool answers, which templates such as Qwen's render (as vLLM gives them)."""
    out = []
    for i, m in enumerate(messages):
        # "developer" is OpenAI's newer name for the system role
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")}
        extra = {"name": m.name, "tool_call_id": m.tool_call_id, "tool_calls": m.tool_calls and
                 [with_parsed_arguments(call) for call in m.tool_calls]}
        out.append(msg | {k: v for k, v in extra.items() if v is not None})
    return out


def with_parsed_arguments(call: dict) -> dict:
    """OpenAI sends a call's arguments as a JSON string; templates write them out as an object (`tojson`),
    so they get the object, as vLLM gives it (a string that is not JSON stays a string)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        return call | {"function": function | {"arguments": json.loads(function["arguments"])}}
    except json.JSONDecodeError:
        return call


# A conversation's messages, counted before any is parsed: 150,000 tiny ones (5 MB, under the body cap)
# took 0.4 s of validation on the event loop, which then answered nothing else, /health included
MAX_MESSAGES = 10_000
