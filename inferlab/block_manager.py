"""BlockManager: the paged KV pool's bookkeeping — ref-counted blocks, prefix caching, LRU eviction.

The pool holds `num_blocks` blocks of `block_size` token slots each; a request's `block_table`
lists its blocks in token order. A block that becomes full is registered under its SHA-256 key
(`block_hash`: parent block's key, its own tokens, and for a first block the model and the
request's cache salt), so a later request with the same prefix reuses it. Freed blocks keep their
key and stay reusable until a new allocation evicts them, least recently freed first.

Invariants (checked by `check_integrity`):
| # | invariant                                                                      |
|---|--------------------------------------------------------------------------------|
| 1 | a block is in the free queue  <=>  its ref_count is 0 (never both free and used) |
| 2 | a block's ref_count == number of live block tables that list it               |
| 3 | hash_to_block[h] == b  <=>  blocks[b].hash == h                                |
| 4 | a cached block's tokens match the tokens at that place in every table using it |
| 5 | a block table has no duplicates and covers its request's computed tokens       |
| 6 | with no live requests, every block is free                                     |
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from itertools import groupby

from inferlab.block_hash import block_hash, extra_keys
from inferlab.request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "parent", "extra")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        # What `hash` was computed from, all compared on a hit: a key that collided (SHA-256 does
        # not, but a test forces it to) would still never serve a block of another prefix.
        self.token_ids: tuple[int, ...] | None = None
        self.parent: bytes | None = None
        self.extra = b""

    def uncache(self) -> None:
        self.hash, self.token_ids, self.parent, self.extra = None, None, None, b""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 model: str = "") -> None:
        """`model` names what computes the K/V (name and dtype): part of every block's key, so
        engines sharing keys across machines never mix two models' blocks."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.model = model
        self.model_extra = extra_keys(model)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Front = evicted first. Blocks without a hash go to the front when freed, cached ones
        # to the back, so reuse of uncached blocks protects the cache.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached
        self.evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_block_extra(self, req: Request) -> bytes:
        """The extra keys of `req`'s first block: the model, and the request's cache salt if any."""
        return self.model_extra if req.cache_salt is None else extra_keys(self.model, None, req.cache_salt)

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks holding a prefix of `req`'s tokens. The last token is never taken from
        the cache, so at least one token is computed and its logits exist."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent, extra = self.block_size, [], None, self.first_block_extra(req)
        for i in range((req.num_tokens - 1) // bs):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens, extra)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tokens or block.parent != parent or block.extra != extra:
                break
            hits.append(block_id)
            parent, extra = h, b""
        return hits

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow `req`'s table to hold `num_new_tokens` more tokens past its computed ones, first
        taking `computed_blocks` (prefix hits, on admission). All or nothing: False if short."""
        if not computed_blocks and req.num_computed_tokens + num_new_tokens <= len(req.block_table) * self.block_size:
            return True  # the common decode step: the last block still has room
        computed_blocks = computed_blocks or []
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = max(0, total - len(req.block_table) - len(computed_blocks))
        reviving = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + reviving > len(self.free_queue):
            return False
        if not req.block_table and not req.num_computed_tokens:  # admitted after a cache lookup: count it
            self.prefix_queries += req.num_tokens
            self.prefix_hits += len(computed_blocks) * self.block_size
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            req.block_table.append(block_id)
            req.block_hashes.append(block.hash)
        for _ in range(num_new_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                self.evict(block)
            block.ref_count = 1
            req.block_table.append(block_id)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that `req`'s computed tokens have filled, so others can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_computed_tokens // bs):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            parent = req.block_hashes[-1] if req.block_hashes else None
            extra = b"" if parent is not None else self.first_block_extra(req)
            h = block_hash(parent, tokens, extra)
            req.block_hashes.append(h)
            block = self.blocks[req.block_table[i]]
            if h not in self.hash_to_block:  # else an identical block is cached already
                block.hash, block.token_ids, block.parent, block.extra = h, tokens, parent, extra
                self.hash_to_block[h] = block.block_id

    def cache_new_full_blocks(self, reqs: list[Request]) -> None:
        """`cache_full_blocks` for each of `reqs` that has filled a block since it was last called:
        one call a step instead of one per request, as most steps fill no block of most requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for req in reqs:
            if req.num_computed_tokens >= (len(req.block_hashes) + 1) * bs:
                self.cache_full_blocks(req)

    def trim(self, req: Request) -> None:
        """Free the blocks at the end of `req`'s table that its tokens do not reach: after drafts were
        rejected, they held only those drafts' K/V. Such blocks were never registered (a block is
        cached once all its tokens are computed and kept), so no cache entry goes with them."""
        keep = self.blocks_needed(req.num_tokens)
        for block_id in reversed(req.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)
        del req.block_table[keep:]

    def free(self, req: Request) -> None:
        # Tail blocks first, so the end of a prefix is evicted before its beginning.
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        req.block_table = []
        req.block_hashes = []

    def evict(self, block: Block) -> None:
        """Drop a free block from the prefix cache, as its slots are about to be reused."""
        del self.hash_to_block[block.hash]
        block.uncache()
        self.evictions += 1

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (used blocks keep theirs until freed)."""
        for block_id in self.free_queue:
            block = self.blocks[block_id]
            if block.hash is not None:
                del self.hash_to_block[block.hash]
                block.uncache()

    def snapshot(self, detail: bool = False) -> dict:
        """Pool counters, O(1): the server refreshes them after every step for /metrics. `detail`
        adds the whole pool as a grid and the counts that need a pass over it (see `grid`)."""
        snap = {"num_blocks": self.num_blocks, "block_size": self.block_size, "free": len(self.free_queue),
                "usage": self.usage, "prefix_queries": self.prefix_queries,
                "prefix_hits": self.prefix_hits, "evictions": self.evictions}
        if detail:
            snap.update(self.grid())  # counts cached_free and shared on the way
        return snap

    def grid(self) -> dict:
        """Every block's state, run-length encoded since a pool has thousands of mostly alike blocks.

        `cells`: [[state, count], ...] in block order, state = ref count (> 1: a shared prefix block),
        0 = free, -1 = free but still cached. `hashes`: [[first_block, "hhhhhh..."], ...], six hex
        digits of each consecutive cached block's key, for a viewer to name a prefix block.
        """
        # One comprehension and groupby (both in C) rather than a Python loop: this runs for every
        # recorded step, over thousands of blocks.
        states = [b.ref_count or (-1 if b.hash is not None else 0) for b in self.blocks]
        cells = [[state, len(list(run))] for state, run in groupby(states)]
        hashes: list[list] = []
        for block_id, h in [(b.block_id, b.hash) for b in self.blocks if b.hash is not None]:
            digits = h[:3].hex()
            if hashes and hashes[-1][0] + len(hashes[-1][1]) // 6 == block_id:
                hashes[-1][1] += digits
            else:
                hashes.append([block_id, digits])
        shared = sum(n for state, n in cells if state > 1)
        cached_free = sum(n for state, n in cells if state < 0)
        return {"cells": cells, "hashes": hashes, "shared": shared, "cached_free": cached_free}

    def check_integrity(self, live: Iterable[Request]) -> None:
        """Raise `AssertionError` naming the first broken invariant (see the table above)."""
        refs = [0] * self.num_blocks
        bs = self.block_size
        for req in live:
            table = req.block_table
            if len(set(table)) != len(table):
                raise AssertionError(f"[5] duplicate block in table of {req.request_id}")
            if len(table) * bs < req.num_computed_tokens:
                raise AssertionError(f"[5] table of {req.request_id} does not cover its computed tokens")
            for i, block_id in enumerate(table):
                refs[block_id] += 1
                block = self.blocks[block_id]
                if block.token_ids is not None and i < len(req.block_hashes) and \
                        tuple(req.token_ids[i * bs:(i + 1) * bs]) != block.token_ids:
                    raise AssertionError(f"[4] block {block_id} tokens differ from {req.request_id}'s")
        for block in self.blocks:
            if (block.ref_count == 0) != (block.block_id in self.free_queue):
                raise AssertionError(f"[1] block {block.block_id} ref_count={block.ref_count} vs free queue")
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(f"[2] block {block.block_id} ref_count={block.ref_count}, "
                                     f"tables hold {refs[block.block_id]}")
            if block.hash is not None and self.hash_to_block.get(block.hash) != block.block_id:
                raise AssertionError(f"[3] block {block.block_id} hash not mapped to it")
        for h, block_id in self.hash_to_block.items():
            if self.blocks[block_id].hash != h:
                raise AssertionError(f"[3] hash entry points at block {block_id} holding another hash")
        if not any(refs) and len(self.free_queue) != self.num_blocks:
            raise AssertionError("[6] no live request but blocks are still in use")
