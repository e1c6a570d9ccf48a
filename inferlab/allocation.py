"""KV allocation: how much of the pool a request takes when it is admitted.

`paged` (vLLM): the blocks its tokens need now, one more as each fills; a request that needs
a block when none is free preempts another. `reserve` (engines before vLLM, and chapter 1 of
docs/learn): its whole possible length, prompt + max_tokens, up front, as one contiguous
buffer would have been. Nothing is ever preempted for lack of blocks then, but most of a
reservation sits empty, and a request whose reservation does not fit beside the others is
refused with an `OutOfKVMemoryError` naming the numbers: the "out of memory" that paging fixes.

Both are objects the scheduler calls the same way; it never asks which one it has.
"""
from __future__ import annotations

from inferlab.block_manager import BlockManager
from inferlab.request import Request


class OutOfKVMemoryError(ValueError):
    """A request refused because its KV reservation does not fit the pool beside the others'."""


class Paged:
    """Blocks on demand: nothing to check on arrival, only this step's tokens on admission."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager

    def add(self, req: Request) -> None:
        """Called when a request arrives, before it is queued; may refuse it (raise)."""

    def release(self, req: Request) -> None:
        """Called once when a request added here finishes, whatever the reason."""

    def admit_tokens(self, req: Request, num_computed: int, num_new: int) -> int:
        """Tokens to allocate room for when `req` is admitted with `num_computed` tokens already in
        the cache and `num_new` scheduled this step."""
        return num_new

    def trim(self, req: Request) -> None:
        """Called after `req`'s drafts were verified: give back the blocks only rejected ones used."""
        self.block_manager.trim(req)

    def check_integrity(self, live: list[Request]) -> None:
        pass

    def snapshot(self) -> dict:
        return {}


class Reserve(Paged):
    """A request reserves blocks for prompt + max_tokens on arrival and takes them all on admission."""

    def __init__(self, block_manager: BlockManager) -> None:
        super().__init__(block_manager)
        self.reserved = 0  # blocks reserved by live requests, admitted or still waiting
        self.holders = 0

    def reservation(self, req: Request) -> int:
        return self.block_manager.blocks_needed(req.num_prompt_tokens + req.max_tokens)

    def add(self, req: Request) -> None:
        bm, need = self.block_manager, self.reservation(req)
        if self.reserved + need > bm.num_blocks:
            raise OutOfKVMemoryError(
                f"out of KV memory: request {req.request_id!r} reserves {need} blocks ({req.num_prompt_tokens} "
                f"prompt + {req.max_tokens} max tokens, {bm.block_size} a block) but only "
                f"{bm.num_blocks - self.reserved} of {bm.num_blocks} are unreserved ({self.holders} requests hold "
                f"{self.reserved}); lower max_tokens or max_model_len, or allocate blocks as they fill "
                f"(kv_allocation='paged', --kv-allocation paged)")
        self.reserved += need
        self.holders += 1

    def release(self, req: Request) -> None:
        self.reserved -= self.reservation(req)
        self.holders -= 1

    def admit_tokens(self, req: Request, num_computed: int, num_new: int) -> int:
        return req.num_prompt_tokens + req.max_tokens - num_computed

    def trim(self, req: Request) -> None:
        """Nothing: the blocks past a request's tokens are its reservation, kept to the end."""

    def check_integrity(self, live: list[Request]) -> None:
        if self.reserved != sum(self.reservation(r) for r in live) or self.holders != len(live):
            raise AssertionError(f"[R] {self.reserved} blocks reserved by {self.holders} requests, live "
                                 f"requests reserve {sum(self.reservation(r) for r in live)} ({len(live)})")
        if self.reserved > self.block_manager.num_blocks:
            raise AssertionError(f"[R] {self.reserved} blocks reserved in a pool of {self.block_manager.num_blocks}")

    def snapshot(self) -> dict:
        return {"reserved": self.reserved}


ALLOCATIONS = {"paged": Paged, "reserve": Reserve}
