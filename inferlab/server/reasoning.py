"""Reasoning parsers (vLLM's `--reasoning-parser`): a thinking model's answer holds its reasoning
between <think> and </think>, then the answer itself. The server gives the two apart, chat's
`reasoning_content` beside `content` (whole, or streamed as deltas of each) and Ollama's
`message.thinking`; tool calls are read from the content alone.
- qwen3: the model opens <think> itself (Qwen3, QwQ); an answer without it is all content (thinking
  turned off by the template's enable_thinking);
- deepseek_r1: the template opens <think> in the prompt (DeepSeek-R1 and its distills), so the answer
  is reasoning until </think>, and all reasoning if cut short before it."""
from __future__ import annotations

from dataclasses import dataclass

from inferlab.server.tool_parsers import partial

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    opened_in_prompt: bool  # the template wrote <think>: the answer starts inside the reasoning

    def split(self, text: str, finished: bool = True) -> tuple[str, str]:
        """(reasoning, content) of an answer so far: what may still be a tag's start is neither until
        it is told apart (unless `finished`). The content's leading newlines are left out."""
        if not self.opened_in_prompt:
            head = text.lstrip()
            if not head.startswith(START):  # no thinking, or not yet known: a "<thi" may be its start
                return "", "" if not finished and START.startswith(head) else text
            text = head[len(START):]
        at = text.find(END)
        if at < 0:  # still reasoning (or cut short in it)
            return text[:len(text) - (0 if finished else partial(text, END))], ""
        return text[:at], text[at + len(END):].lstrip("\n")


PARSERS = {"qwen3": ReasoningParser(opened_in_prompt=False), "deepseek_r1": ReasoningParser(opened_in_prompt=True)}


class ReasoningStream:
    """One streamed answer: `step(text, finished)` -> (the new reasoning, the content so far, the new
    content), each sent once."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser, self.reasoned, self.said = parser, 0, 0

    def step(self, text: str, finished: bool) -> tuple[str, str, str]:
        reasoning, content = self.parser.split(text, finished)
        new_reasoning, self.reasoned = reasoning[self.reasoned:], max(self.reasoned, len(reasoning))
        new_content, self.said = content[self.said:], max(self.said, len(content))
        return new_reasoning, content, new_content
