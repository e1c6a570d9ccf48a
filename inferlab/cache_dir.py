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
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("inferlab")


@functools.cache
def _default_root() -> Path:
    home = Path("~/.cache/inferlab")
    try:
        home = home.expanduser()  # no HOME and no passwd entry (a container's --user): RuntimeError
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
        reason = "not writable"
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    fallback = _private_temp_dir()
    log.warning("cannot use %s (%s): caching in %s instead (set INFERLAB_CACHE to choose)", home, reason, fallback)
    return fallback


def _private_temp_dir() -> Path:
    """A folder in the shared temporary directory that only this user can write: the kernels cached
    there are loaded as code, so a folder another user made (or can write to) is never taken."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"inferlab-{uid if uid is not None else 'user'}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if uid is None or (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022):
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="inferlab-"))  # this process's alone: nothing cached between runs


def cache_dir(kind: str) -> Path:
    """The folder for `kind` ("kernels", "models"); not created here (the writer makes it when it writes)."""
    if os.environ.get("INFERLAB_CACHE"):  # read each time: tests and users may point it elsewhere mid-process
        return Path(os.environ["INFERLAB_CACHE"]) / kind
    return _default_root() / kind  # an empty INFERLAB_CACHE too (not the current folder)
