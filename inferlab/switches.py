"""On/off switches read from the environment (INFERLAB_NATIVE, INFERLAB_MODEL_CACHE): the words people
write for either; any other value is refused by name, not read as on."""
from __future__ import annotations

import os

OFF = ("0", "false", "off", "no")
ON = ("1", "true", "on", "yes", "")


def env_switch(name: str, default: bool = True) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in OFF + ON:
        raise ValueError(f"{name}={raw}: 0 (off) or 1 (on)")
    return value not in OFF
