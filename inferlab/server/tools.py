"""Tool calling on /v1/chat/completions, as vLLM does it. The tools go to the chat template, which
writes them into the prompt (Qwen's and Llama 3's templates do); `tool_choice` says what the answer
may be:
- "none": the tools stay out of the prompt, and the answer is text;
- a named function: the answer is held to that function's parameters (a structured output), and
  is that call's arguments;
- "required": the answer is held to a JSON array of calls to the tools, one at least, each
  {"name", "parameters"} (vLLM's shape);
- "auto" (OpenAI's default when tools are given): the model writes text, calls or both, in its own
  format, which a tool-call parser reads; the server needs `--enable-auto-tool-choice` and
  `--tool-call-parser` for it, as vLLM's does (tool_parsers.py: hermes, llama3_json, mistral,
  pythonic, llama4_pythonic, qwen3_coder).
A stream sends a call's arguments as they come where the answer is only that (a named function),
else the calls whole in the last chunk, and text before any call as it comes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictStr

from inferlab.server.tool_parsers import PARSERS, Call, Parser
from inferlab.structured.params import StructuredOutputsParams


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")  # strict and the like change nothing here

    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: ToolFunction


@dataclass
class ToolPlan:
    mode: Literal["none", "named", "required", "auto"]
    tools: list[Tool] = field(default_factory=list)
    name: str | None = None  # the named function's
    parallel: bool = True  # false: one call at most (OpenAI's parallel_tool_calls)
    parser: Parser | None = None  # auto's
    ids: Parser = field(default_factory=Parser)  # whose call ids: the server's parser's (Mistral's are short)

    @classmethod
    def of(cls, tools: list[Tool] | None, choice: Any, parser: str | None, parallel: bool = True) -> ToolPlan:
        """`choice`: the request's tool_choice (None: "auto" with tools, as OpenAI's); `parser`: the
        server's --tool-call-parser where it enabled auto tool choice."""
        tools = tools or []
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise ValueError(f"tool_choice must be none, auto, required or {{'type': 'function', 'function': "
                                 f"{{'name': ...}}}}, got {choice!r}")
            if name not in {t.function.name for t in tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
            return cls("named", tools, name, parallel, ids=PARSERS.get(parser, Parser()))
        choice = choice if choice is not None else ("auto" if tools else "none")
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be none, auto, required or a named function, got {choice!r}")
        if choice == "none" or not tools:
            if choice == "required":
                raise ValueError("tool_choice required needs tools")
            return cls("none")
        if choice == "auto" and parser is None:
            raise ValueError('tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                             "--tool-call-parser (vLLM's flags); send tool_choice required, a named function, "
                             "or none")
        return cls(choice, tools, None, parallel, PARSERS[parser] if choice == "auto" else None,
                   PARSERS.get(parser, Parser()))

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template reads them (vLLM's: each {"type", "function"}); none: left out."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.mode != "none" else None

    def structured(self) -> StructuredOutputsParams | None:
        """The constraint the answer is held to: a named function's parameters, or the array of calls."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return StructuredOutputsParams(json=tool.function.parameters or {"type": "object"})
        if self.mode == "required":
            one = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                     "parameters": t.function.parameters or {"type": "object"}},
                    "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
            return StructuredOutputsParams(json=calls if self.parallel else {**calls, "maxItems": 1})
        return None

    def call(self, name: str, arguments: str) -> dict:
        return {"id": self.ids.new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """A finished answer as (content, tool_calls)."""
        content, calls = self.read(text)
        return content, [self.call(*c) for c in calls]

    def read(self, text: str) -> tuple[str | None, list[Call]]:
        if self.mode == "named":
            return None, [(self.name, text)]
        if self.mode == "required":
            try:
                return None, [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
            except (json.JSONDecodeError, TypeError, KeyError):  # cut short by max_tokens: the text as it is
                return text, []
        if self.mode == "auto":
            content, calls = self.parser.parse(text, self.tools)
            return content, calls if self.parallel else calls[:1]
        return text, []

    def finish_reason(self, reason: str | None, calls: list[dict] | None) -> str | None:
        """OpenAI's: "tool_calls" where auto or required ended in `calls`, else the engine's `reason`."""
        return "tool_calls" if reason == "stop" and calls and self.mode in ("auto", "required") else reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice's deltas: `delta(new_text, text, finished)` -> the delta's fields."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan, self.sent, self.held, self.opened = plan, 0, False, False

    def delta(self, new_text: str, text: str, finished: bool) -> dict:
        mode = self.plan.mode
        if mode == "none":
            return {"content": new_text} if new_text else {}
        if mode == "named":
            if not new_text and self.opened:
                return {}
            part = {"index": 0, "function": {"arguments": new_text}}
            if not self.opened:
                self.opened = True
                first = self.plan.call(self.plan.name, new_text)
                part = {"index": 0, "id": first["id"], "type": "function", "function": first["function"]}
            return {"tool_calls": [part]}
        out: dict = {}
        if mode == "auto" and not self.held:  # text until a call may be starting (a "<tool_c" is held back)
            end, self.held = self.plan.parser.cut(text, self.sent)
            if end > self.sent:
                out["content"] = text[self.sent:end]
                self.sent = end
        if finished:
            content, calls = self.plan.message(text)
            if calls:
                out["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
            elif content and len(content) > self.sent:  # no call after all: the text held back
                out["content"] = out.get("content", "") + content[self.sent:]
        return out

