"""Preemption: what becomes of a preempted request's KV, and how it comes back.

`recompute` (vLLM v1): the victim's blocks are freed and its tokens computed again when it is
readmitted — often cheaply, since freed blocks stay in the prefix cache until reused.
`swap` (vLLM v0, the GPU-ready path): the victim's computed blocks are copied to a host pool,
the device blocks freed, and on readmission copied back into new blocks; nothing is recomputed.
Where the host pool is full the victim is recomputed instead.

The scheduler decides which blocks move; the copies themselves are listed in its output
(`swap_out`, `swap_in`: (device block, host block) pairs) for whoever owns the tensors to do
before the step runs: `kv_swap.HostKVPool` on the engine, a cost per byte in the simulator.

Swap invariants (checked by `check_integrity`):
| # | invariant                                                                    |
|---|------------------------------------------------------------------------------|
| 1 | a host block is either free or in exactly one swapped request's host table  |
| 2 | only waiting (preempted) requests hold host blocks, and they hold no device blocks |
| 3 | a swapped request's host table covers exactly its computed tokens            |
| 4 | any other waiting request has nothing computed                               |
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from inferlab.block_manager import BlockManager
from inferlab.request import Request

if TYPE_CHECKING:
    from inferlab.scheduler_output import SchedulerOutput


class Recompute:
    """Drop the victim's KV; on readmission take what the prefix cache still holds, compute the rest."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager

    def preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0

    def resume(self, req: Request) -> tuple[list[int], int]:
        """(cached blocks to take, tokens already computed) for a waiting request about to be admitted:
        none for a prompt being scored (prompt_logprobs, as vLLM's) or mean-pooled, whose every row must
        be computed."""
        computed = [] if req.computes_prompt else self.block_manager.get_computed_blocks(req)
        return computed, len(computed) * self.block_manager.block_size

    def resumed(self, req: Request, out: SchedulerOutput) -> None:
        """`req` was admitted and given its blocks."""

    def release(self, req: Request) -> None:
        """`req` finished or was aborted, perhaps while preempted."""

    def check_integrity(self, waiting: list[Request]) -> None:
        for req in waiting:
            if req.block_table or req.num_computed_tokens:
                raise AssertionError(f"[4] waiting request {req.request_id} holds KV state")

    def snapshot(self) -> dict:
        return {}


class Swap(Recompute):
    """Move the victim's computed blocks to `num_host_blocks` host blocks and back."""

    def __init__(self, block_manager: BlockManager, num_host_blocks: int) -> None:
        super().__init__(block_manager)
        self.num_host_blocks = num_host_blocks
        # Host blocks below `used` were handed out at least once; those free again are in `host_free`.
        # (A pool of GiBs has millions of small blocks: they are not listed before they are needed.)
        self.used = 0
        self.host_free: list[int] = []
        self.swapped: dict[Request, list[int]] = {}  # a preempted request's host table
        self.blocks_out = self.blocks_in = 0  # blocks copied each way so far
        self.fallbacks = 0  # preemptions recomputed because the host pool was full

    def preempt(self, req: Request, out: SchedulerOutput) -> None:
        n = self.block_manager.blocks_needed(req.num_computed_tokens)
        if n == 0 or n > self.num_free:
            self.fallbacks += n > 0
            return super().preempt(req, out)
        reused = [self.host_free.pop() for _ in range(min(n, len(self.host_free)))]
        fresh = list(range(self.used, self.used + n - len(reused)))
        self.used += len(fresh)
        host = reused + fresh
        out.swap_out.extend(zip(req.block_table[:n], host))
        self.swapped[req] = host
        self.blocks_out += n
        computed = req.num_computed_tokens
        self.block_manager.free(req)  # the device blocks stay readable until the step's copies are done
        req.num_computed_tokens = computed

    @property
    def num_free(self) -> int:
        return len(self.host_free) + self.num_host_blocks - self.used

    def resume(self, req: Request) -> tuple[list[int], int]:
        if req in self.swapped:
            return [], req.num_computed_tokens
        return super().resume(req)

    def resumed(self, req: Request, out: SchedulerOutput) -> None:
        host = self.swapped.pop(req, None)
        if host is None:
            return
        out.swap_in.extend(zip(req.block_table, host))
        self.host_free.extend(host)  # free now: this step's copies all run before the next schedule
        self.blocks_in += len(host)

    def release(self, req: Request) -> None:
        self.host_free.extend(self.swapped.pop(req, []))

    def check_integrity(self, waiting: list[Request]) -> None:
        held = [b for host in self.swapped.values() for b in host]
        if sorted(held + self.host_free) != list(range(self.used)) or self.used > self.num_host_blocks:
            raise AssertionError("[1] host blocks lost, or held twice")
        waiting_ids = {id(r) for r in waiting}
        for req, host in self.swapped.items():
            if id(req) not in waiting_ids or req.block_table:
                raise AssertionError(f"[2] swapped request {req.request_id} is not waiting, or holds device blocks")
            if len(host) != self.block_manager.blocks_needed(req.num_computed_tokens):
                raise AssertionError(f"[3] {req.request_id}: {len(host)} host blocks for "
                                     f"{req.num_computed_tokens} computed tokens")
        super().check_integrity([r for r in waiting if r not in self.swapped])

    def snapshot(self) -> dict:
        return {"host_blocks": self.num_host_blocks, "host_free": self.num_free, "swapped_out": self.blocks_out,
                "swapped_in": self.blocks_in, "swap_fallbacks": self.fallbacks}


def make_preemption(mode: str, block_manager: BlockManager, num_host_blocks: int) -> Recompute:
    return Swap(block_manager, num_host_blocks) if mode == "swap" else Recompute(block_manager)
