"""How models write tool calls, for tool_choice "auto" (tools.py): one parser per format, named as
vLLM's `--tool-call-parser` names them. `parse(text, tools)` -> (the text around the calls, the
calls as (name, arguments JSON)); `cut(text, sent)` -> (how far the text may stream now, whether a
call has begun: nothing after it streams); `new_id()` -> a call's id (Mistral's templates take only
nine letters and digits). Special tokens are left out of the text, so each format is read from the
marks that remain: those that are plain text, or the shape of the answer itself."""
from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid
from typing import Any

Call = tuple[str, str]  # (name, arguments as a JSON text)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"


class Parser:
    @staticmethod
    def new_id() -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"


class Tagged(Parser):
    """Calls inside <tool_call> ... </tool_call> blocks; text before and between them is content."""

    def parse(self, text: str, tools: list) -> tuple[str | None, list[Call]]:
        """The calls in `text` (the last block maybe unclosed) and the text around them; a block that
        is not a call stays text."""
        calls, kept, at = [], [], 0
        for m in re.finditer(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", text, re.DOTALL):
            one = self.block(m.group(1), tools)
            if one is None:
                continue
            kept.append(text[at:m.start()])
            at = m.end()
            calls.append(one)
        content = ("".join(kept) + text[at:]).strip() if calls else text
        return content or None, calls

    def block(self, body: str, tools: list) -> Call | None:
        raise NotImplementedError

    @staticmethod
    def cut(text: str, sent: int) -> tuple[int, bool]:
        start = text.find(OPEN, sent)
        return (start, True) if start >= 0 else (len(text) - partial(text, OPEN), False)


class Hermes(Tagged):
    """<tool_call>{"name", "arguments"}</tool_call> (Qwen 2.5 and 3, NousResearch's Hermes)."""

    def block(self, body: str, tools: list) -> Call | None:
        return as_call(body)


class Qwen3Coder(Tagged):
    """Qwen3-Coder's XML: <tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function>
    </tool_call>. A value is text, read as the tool's schema types its parameter (a number, a
    boolean, an object or array as JSON; else, or where it does not parse so, a string)."""

    FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?$", re.DOTALL)
    PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)

    def block(self, body: str, tools: list) -> Call | None:
        m = self.FUNCTION.match(body)
        if m is None:
            return None
        name = m.group(1).strip()
        props = next(((t.function.parameters or {}).get("properties") or {} for t in tools
                      if t.function.name == name), {})
        args = {k.strip(): typed(v, (props.get(k.strip()) or {}).get("type")) for k, v in
                self.PARAMETER.findall(m.group(2))}
        return name, json.dumps(args, ensure_ascii=False)


class Llama3Json(Parser):
    """Llama 3.1-3.3's: the answer is the call, {"name", "parameters"} (several joined by "; "), after
    an optional <|python_tag|>; an answer that starts otherwise is text."""

    @staticmethod
    def parse(text: str, tools: list) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = [as_call(part) for part in ([body] if as_call(body) else body.split("; "))]
        return (text, []) if None in calls else (None, calls)

    @staticmethod
    def cut(text: str, sent: int) -> tuple[int, bool]:
        return whole_answer(text, sent, ("{", PYTHON_TAG))


class Mistral(Parser):
    """Mistral's: [TOOL_CALLS] then a JSON array of {"name", "arguments"}, after any text. The tag is a
    special token, left out of the text, so an answer that is such an array is read as calls too."""

    @staticmethod
    def parse(text: str, tools: list) -> tuple[str | None, list[Call]]:
        at = text.find(MISTRAL_TAG)
        content, body = (text[:at], text[at + len(MISTRAL_TAG):]) if at >= 0 else ("", text)
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        calls = [as_call(json.dumps(v)) for v in (value if isinstance(value, list) else [value])]
        if not calls or None in calls:
            return text, []
        return content.strip() or None, calls

    @staticmethod
    def cut(text: str, sent: int) -> tuple[int, bool]:
        at = text.find(MISTRAL_TAG, sent)
        if at >= 0:
            return at, True
        end, begun = whole_answer(text, sent, ("[",))
        return (end - partial(text, MISTRAL_TAG) if not begun else end), begun

    @staticmethod
    def new_id() -> str:  # Mistral's chat templates refuse a call id of other than nine letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


class Pythonic(Parser):
    """Llama 3.2's and Llama 4's: the answer is a Python list of calls with keyword arguments,
    [get_weather(city="Paris"), get_time(zone="UTC")]; an answer that is not one is text."""

    @staticmethod
    def parse(text: str, tools: list) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = []
            for c in tree.elts:
                if not (isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args
                        and all(k.arg for k in c.keywords)):
                    return text, []
                args = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
                calls.append((c.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return text, []
        return None, calls

    @staticmethod
    def cut(text: str, sent: int) -> tuple[int, bool]:
        return whole_answer(text, sent, ("[",))


PARSERS: dict[str, Parser] = {"hermes": Hermes(), "llama3_json": Llama3Json(), "mistral": Mistral(),
                              "pythonic": Pythonic(), "llama4_pythonic": Pythonic(), "qwen3_coder": Qwen3Coder()}


def as_call(body: str) -> Call | None:
    """A call from its JSON ({"name", "arguments" or "parameters"}), or None if it is not one."""
    try:
        value = json.loads(body)
        name, args = value["name"], value.get("arguments", value.get("parameters", {}))
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def typed(value: str, kind: Any) -> Any:
    """A parameter's text as its schema's type says."""
    if kind == "string":
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    fits = {"integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}.get(kind)
    return parsed if fits is None or isinstance(parsed, fits) else value


def whole_answer(text: str, sent: int, starts: tuple[str, ...]) -> tuple[int, bool]:
    """cut() where a call is the whole answer: text streams from its first characters unless they may
    begin one of `starts`, which holds it all back."""
    head = text.lstrip()
    if sent or (head and not head.startswith(starts) and not any(s.startswith(head) for s in starts)):
        return len(text), False
    return 0, head.startswith(starts)


def partial(text: str, tag: str) -> int:
    """How many of `text`'s last characters could be the start of `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
