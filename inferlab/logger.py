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
        log.propagate = False  # one line per message even when the application configures the root
        level = os.environ.get("INFERLAB_LOG_LEVEL", "INFO").upper()
        level = int(level) if level.isdigit() else level  # logging takes a number too, not as a string
        try:
            log.setLevel(level)
        except ValueError:  # a typo here must not stop `import inferlab`
            log.setLevel("INFO")
            log.warning("INFERLAB_LOG_LEVEL=%r is no logging level (DEBUG, INFO, WARNING, ERROR or CRITICAL); "
                        "using INFO", level)
    return log
