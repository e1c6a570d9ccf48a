"""The `inferlab` logger: INFO to stderr by default (like vLLM), so the pool size shows at start.
INFERLAB_LOG_LEVEL=WARNING (or DEBUG, ...) changes the level; a program may reconfigure it."""
from __future__ import annotations

import logging
import os


def setup_logging() -> logging.Logger:
    log = logging.getLogger("inferlab")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(os.environ.get("INFERLAB_LOG_LEVEL", "INFO").upper())
        log.propagate = False  # one line per message even when the application configures the root
    return log
