"""Keep freed memory in the process instead of handing it back to the OS, on glibc.

A step's activations are large and short-lived: a 2048-token prefill allocates tens of MiB of
them per layer. By default glibc serves big requests with fresh mmaps and returns heap tops to
the OS, so the next step faults every page in again (zeroed by the kernel): a prefill of 64
prompts of 300 tokens took 642k page faults and 5.0 s, and 118k faults and 4.2 s (the KV pool's
first touches) once freed memory stayed. Resident memory then holds the largest step's
activations, which it reaches anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading
import weakref

log = logging.getLogger("inferlab")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LARGE = 1 << 30


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it; True where glibc accepted. Process-wide,
    set once; a no-op elsewhere (musl, macOS)."""
    try:
        mallopt = _libc().mallopt
    except AttributeError:  # no libc found (None), or none with mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, LARGE)) and bool(mallopt(M_TRIM_THRESHOLD, LARGE))
    if not ok:
        log.debug("mallopt refused: freed memory goes back to the OS")
    return ok


def give_back_freed_memory() -> bool:
    """malloc_trim(0): the heap's free pages back to the OS; True where glibc did it."""
    trim = getattr(_libc(), "malloc_trim", None)
    return trim is not None and trim(0) >= 0


def give_back_when_freed(owner: object) -> None:
    """Once `owner` (an engine) is collected, give back the memory it kept (what it freed stays in
    the heap for its next step, and would stay for the process's life: a notebook's second LLM()).
    A moment later, when its attributes are freed too: the callback runs before they are."""
    if keep_freed_memory():
        weakref.finalize(owner, lambda: threading.Timer(0.2, give_back_freed_memory).start()).atexit = False
