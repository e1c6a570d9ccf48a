"""StructuredOutputsParams: what a request's text must match (vLLM's names), and that as one grammar
in llguidance's form (Lark, its JSON schemas and regular expressions included)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one of: `json`, a JSON schema (a dict, or its text); `regex`; `choice`, the texts the
    answer may be; `grammar`, in Lark (llguidance's) or GBNF (llama.cpp's, rules written `::=`);
    `json_object`, any JSON object (OpenAI's `response_format` json_object, Ollama's `format: json`).
    Checked on construction: a schema, regex or grammar that cannot be compiled is a ValueError."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # (the fields' JSON, their grammar): what `lark` made, for the fields as they were then; and the
    # fields' JSON when they last passed `validate`
    _compiled: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)
    _valid: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(self.json, dict):
                raise ValueError(f"a JSON schema must be an object, got {type(self.json).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"regex must be a non-empty string, got {self.regex!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice or
                                        any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError(f"choice must be a list of non-empty strings, got {self.choice!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"grammar must be a non-empty string, got {self.grammar!r}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be true or false, got {self.json_object!r}")
        if self._valid == self._key():
            return  # checked already (a request's params are validated when made, forked and added)
        from llguidance import LLMatcher
        try:
            failed, messages = LLMatcher.validate_grammar_with_warnings(self.lark())
        except Exception as e:  # (the GBNF translator raises its own errors)
            failed, messages = True, [str(e)]
        if failed:
            what = {"json": "JSON schema", "json_object": "JSON grammar"}.get(given[0], given[0])
            raise ValueError(f"the {what} cannot be compiled: {one_line(' '.join(messages))}")
        self._valid = self._key()

    def _key(self) -> str:
        return json.dumps([getattr(self, k) for k in KINDS], sort_keys=True, default=repr)

    def lark(self) -> str:
        """The constraint as one llguidance grammar (made once for the fields as they are)."""
        key = self._key()
        if self._compiled is None or self._compiled[0] != key:
            self._compiled = key, self._grammar()
        return self._compiled[1]

    def _grammar(self) -> str:
        from llguidance import LLMatcher
        if self.json is not None or self.json_object:
            return LLMatcher.grammar_from_json_schema(self.json if self.json is not None else {"type": "object"})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # each text a literal (JSON's quoting is Lark's)
            return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        if "::=" in self.grammar:
            from llguidance.gbnf_to_lark import gbnf_to_lark
            return gbnf_to_lark(self.grammar)
        return self.grammar


def one_line(message: str) -> str:
    """llguidance's error, which draws the place with carets over several lines, as one line: its
    first, and the line that says what is wrong where the first does not."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    detail = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {detail}" if detail else (lines[0] if lines else "unknown error")
