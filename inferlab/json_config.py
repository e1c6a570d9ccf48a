"""A config given as a dict or as its JSON text (vLLM's `--kv-transfer-config` and
`--speculative-config` take the JSON on the command line): one parse, one kind of error; and the
type check every config dataclass runs on its simple fields."""
from __future__ import annotations

import json
import numbers
from dataclasses import fields

# What a field's annotation allows, for the simple ones (a bool is no number here)
KINDS = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
         "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
         "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str), "None": lambda v: v is None}


def check_types(config, prefix: str = "") -> None:
    """A dataclass field whose annotation is made of int, float, bool, str and None must hold one of
    them: "2048" or "yes" fail here by name, not as a TypeError deep inside, or silently."""
    for f in fields(config):
        kinds = [k.strip() for k in f.type.split("|")]
        value = getattr(config, f.name)
        if all(k in KINDS for k in kinds) and not any(KINDS[k](value) for k in kinds):
            raise ValueError(f"{prefix}{f.name} must be {' or '.join(kinds)}, got {value!r}")


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
