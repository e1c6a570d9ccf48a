"""A nested config given as a dict or as its JSON text (vLLM's `--kv-transfer-config` and
`--speculative-config` take the JSON on the command line): one parse, one kind of error."""
from __future__ import annotations

import json


def json_object(value: dict | str, name: str) -> dict:
    """`value` as a dict; a `ValueError` naming `name` if it is not valid JSON or not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a dict), got {type(value).__name__}")
    return value
