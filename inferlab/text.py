"""Whether a str is text at all: Python's str can hold lone surrogates (bytes that were no UTF-8,
read from a terminal or a file, or "\ud800" escaped in JSON), which no tokenizer or output takes;
and the text of a terminal's UTF-8 bytes that Python read under a locale that is not UTF-8."""
from __future__ import annotations


def is_text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def terminal_text(s: str) -> str:
    """`s` as the UTF-8 a terminal sent: under an ASCII locale (LC_ALL=C with PYTHONUTF8=0) Python reads
    each byte past ASCII as a lone surrogate (surrogateescape), which makes "café" no text. Bytes that are
    no UTF-8 either are left as they were, to be refused."""
    if is_text(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return s
