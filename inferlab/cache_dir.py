"""Where InferLab keeps what it builds once per machine: the compiled kernels and parsed models.

`$INFERLAB_CACHE/<kind>`, default `~/.cache/inferlab/<kind>`. Where the default cannot be written (a
container with a read-only or missing home), a per-user folder in the system's temporary directory
serves instead, with one warning: losing the kernel cache would mean running the PyTorch path,
several times slower. A folder the user named is never replaced behind their back.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("inferlab")


@functools.cache
def _default_root() -> Path:
    home = Path.home() / ".cache" / "inferlab"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
        reason = "not writable"
    except OSError as e:
        reason = e.strerror or str(e)
    fallback = Path(tempfile.gettempdir()) / f"inferlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    log.warning("cannot use %s (%s): caching in %s instead (set INFERLAB_CACHE to choose)", home, reason, fallback)
    return fallback


def cache_dir(kind: str) -> Path:
    """The folder for `kind` ("kernels", "models"); not created here (the writer makes it when it writes)."""
    if "INFERLAB_CACHE" in os.environ:  # read each time: tests and users may point it elsewhere mid-process
        return Path(os.environ["INFERLAB_CACHE"]) / kind
    return _default_root() / kind
