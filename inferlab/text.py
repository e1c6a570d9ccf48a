"""Whether a str is text at all: Python's str can hold lone surrogates (bytes that were no UTF-8,
read from a terminal or a file, or "\ud800" escaped in JSON), which no tokenizer or output takes."""
from __future__ import annotations


def is_text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True
