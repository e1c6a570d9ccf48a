"""Backend: one `inferlab serve` instance behind the router — its URL, whether it answers its
health check, and the router's own counts of what it sent there. `load` (requests in flight) is
what the least-loaded and prefix-aware policies compare."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import httpx

from inferlab.block_hash import block_hash

log = logging.getLogger("inferlab")

PREFIX_CHUNK = 128  # bytes of prompt text per prefix key
PREFIX_BLOCKS = 16  # keys for the first this many chunks: prompts that share 2 KiB share a home


class Backend:
    def __init__(self, url: str, role: str = "serve") -> None:
        self.url = url.rstrip("/")
        self.role = role  # serve, prefill or decode
        self.healthy = True
        # its health check timed out: it takes connections and answers nothing (stopped, hung). One
        # that refuses them or answers an error may be draining: what it has in flight still comes
        self.hung = False
        self.in_flight = 0
        self.requests = self.errors = 0

    @property
    def load(self) -> int:
        return self.in_flight

    def mark(self, healthy: bool, why: str = "", hung: bool = False) -> None:
        if healthy != self.healthy:
            if healthy:
                log.info("backend %s is back", self.url)
            else:
                log.warning("backend %s is out of rotation: %s", self.url, why)
        self.healthy, self.hung = healthy, hung and not healthy

    async def check(self, client: httpx.AsyncClient, timeout: float) -> None:
        try:
            ok = (await client.get(f"{self.url}/health", timeout=timeout)).status_code == 200
            self.mark(ok, "its health check failed")
        except httpx.TimeoutException as e:
            self.mark(False, f"{type(e).__name__}: {e}", hung=True)
        except httpx.HTTPError as e:
            self.mark(False, f"{type(e).__name__}: {e}")


async def health_loop(backends: Sequence[Backend], client: httpx.AsyncClient, interval: float) -> None:
    """Check every backend each `interval` seconds: a dead one leaves the rotation, a live one returns."""
    while True:
        await asyncio.gather(*(b.check(client, min(interval, 2.0)) for b in backends))
        await asyncio.sleep(interval)


def prompt_bytes(body: dict) -> bytes:
    """A request's prompt as bytes: a chat's messages in order, a completion's text (an embedding's
    input, a rerank's query, a score's first text), or its token ids (4 bytes each); the first
    prompt of a batch. Anything malformed gives nothing (the backend answers it with its own error)."""
    messages = body.get("messages")
    prompt = next((body[k] for k in ("prompt", "input", "query", "text_1") if k in body), None)
    if isinstance(messages, list):
        text = "".join(f"{m.get('role')}\n{m.get('content')}\n" for m in messages if isinstance(m, dict))
        return text.encode(errors="surrogatepass")  # a lone surrogate is the backend's to refuse
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: its first prompt
    if isinstance(prompt, str):
        return prompt.encode(errors="surrogatepass")
    if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < 2**32 for t in prompt):
        return b"".join(t.to_bytes(4, "little") for t in prompt[:PREFIX_CHUNK * PREFIX_BLOCKS // 4])
    return b""


def prefix_keys(body: dict) -> list[bytes]:
    """The chain hashes of the prompt's first blocks: its bytes (`prompt_bytes`) in chunks of
    PREFIX_CHUNK, each key naming the chunk and all before it. The router does not tokenize, so
    these are blocks of text (or of token ids), not the engine's token blocks."""
    data = prompt_bytes(body)[:PREFIX_CHUNK * PREFIX_BLOCKS]
    keys: list[bytes] = []
    for i in range(0, len(data), PREFIX_CHUNK):
        keys.append(block_hash(keys[-1] if keys else None, data[i:i + PREFIX_CHUNK]))
    return keys
