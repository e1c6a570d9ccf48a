"""The prefix cache's key for a full KV block: a SHA-256 digest that names the block's whole prefix.

A block's K/V depend on every token before it, on the model that computed them and on anything
else that changes attention's inputs (a LoRA adapter). So a block is keyed by its parent block's
digest, its own token ids, and extra keys; the first block of a sequence has no parent and
carries the extra keys, which the chain then carries to every later block. A cryptographic digest
(not Python's 64-bit `hash`) is what makes the key safe to trust: nobody can craft a prompt whose
block collides with another tenant's and be served K/V computed under someone else's prefix
(the class of vLLM's advisory GHSA-rm76-4mrf-v9r8). A per-request `cache_salt` in the extra
keys keeps tenants that must not share a cache apart even when their prompts are equal.

The bytes hashed are fixed, so that engines on other machines (a KV connector) compute the same
key for the same block:

    parent digest (32 bytes; 32 zero bytes for the first block)
    | number of tokens (uint32, little-endian) | token ids (int64 each, little-endian)
    | extra (bytes, from `extra_keys`: UTF-8 JSON of [model, lora, cache_salt])
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

NO_PARENT = bytes(32)
_packers: dict[int, struct.Struct] = {}  # per token count: the count and the ids in one pack call


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """The 32-byte SHA-256 key of a full block (see the module docstring for the exact bytes)."""
    n = len(tokens)
    packer = _packers.get(n) or _packers.setdefault(n, struct.Struct(f"<I{n}q"))
    return hashlib.sha256((parent or NO_PARENT) + packer.pack(n, *tokens) + extra).digest()


def extra_keys(model: str = "", lora: str | None = None, cache_salt: str | None = None) -> bytes:
    """What besides the tokens changes a sequence's K/V, as the bytes `block_hash` takes for the
    first block: the model (name and dtype), a LoRA adapter's name, a cache salt."""
    return json.dumps([model, lora, cache_salt], ensure_ascii=False, separators=(",", ":")).encode()
