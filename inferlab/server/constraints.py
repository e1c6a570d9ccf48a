"""What a request body asks its answer to match: the structured-output fields of each client
(OpenAI's `response_format`, vLLM's `structured_outputs` and older `guided_*`, llama.cpp server's
`json_schema` and `grammar`) read as the one StructuredOutputsParams they may ask for."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, StrictStr

from inferlab.structured.params import KINDS, StructuredOutputsParams


class ConstraintFields(BaseModel):
    # a structured output (inferlab/structured/), by any of its clients' names: OpenAI's, vLLM's
    # (and its older guided_*), llama.cpp server's
    response_format: dict[StrictStr, Any] | None = None
    structured_outputs: dict[StrictStr, Any] | None = None
    guided_json: dict[StrictStr, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    json_schema: dict[StrictStr, Any] | None = None
    grammar: StrictStr | None = None

    def structured(self) -> StructuredOutputsParams | None:
        """The one structured output the body asks for, by whichever name (None: free text)."""
        asked = {name: value for name, value in (
            ("response_format", response_format_constraint(self.response_format)),
            ("structured_outputs", self.structured_outputs),
            ("guided_json", None if self.guided_json is None else {"json": self.guided_json}),
            ("guided_regex", None if self.guided_regex is None else {"regex": self.guided_regex}),
            ("guided_choice", None if self.guided_choice is None else {"choice": self.guided_choice}),
            ("guided_grammar", None if self.guided_grammar is None else {"grammar": self.guided_grammar}),
            ("json_schema", None if self.json_schema is None else {"json": self.json_schema}),
            ("grammar", None if self.grammar is None else {"grammar": self.grammar})) if value}
        if len(asked) > 1:
            raise ValueError(f"{' and '.join(asked)} both constrain the output: send one")
        if not asked:
            return None
        (name, fields), = asked.items()
        unknown = set(fields) - set(KINDS)
        if unknown:
            raise ValueError(f"{name}: unknown field {sorted(unknown)[0]!r}; it takes one of {', '.join(KINDS)}")
        try:
            return StructuredOutputsParams(**fields)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def response_format_constraint(fmt: dict | None) -> dict | None:
    """OpenAI's `response_format` as StructuredOutputsParams fields: json_object, or json_schema's
    `schema` (a json_schema without one: any JSON object); text: none."""
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"json_object": True}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format json_schema needs a json_schema object (with its schema)")
        schema = spec.get("schema")
        return {"json": schema} if schema is not None else {"json_object": True}
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {fmt.get('type')!r}")
