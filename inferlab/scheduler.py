"""Scheduler: continuous batching under one token budget (vLLM v1's rule).

Each step, every request's `num_computed_tokens` tries to catch up with its `num_tokens`:
running requests first (a decode needs 1 token, an unfinished prefill the next chunk), then
waiting ones in policy order, all under the token budget and `max_num_seqs`. Prefill,
chunked prefill and decode are therefore one path and share a step. When KV blocks run out
the policy's victim is preempted instead of failing: its blocks are freed and recomputed later,
or swapped to a host pool and back (`preemption.py`). How much a request takes on admission,
what it needs or its whole length, is `allocation.py`'s to say. With a KV connector
(`kv_transfer`), a request whose prefix a store holds is admitted to wait for its blocks to load
(WAITING_FOR_REMOTE_KVS) beside the running batch, and joins it when they are in.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from inferlab.allocation import ALLOCATIONS
from inferlab.block_manager import BlockManager
from inferlab.budget import START
from inferlab.config import EngineConfig
from inferlab.kv_transfer import KVConnectorBase
from inferlab.kv_transfer.loads import RemoteLoads
from inferlab.policy import RequestQueue, by_key, head_of, may_preempt, pick_victim, requeue, take
from inferlab.preemption import make_preemption
from inferlab.request import Request, RequestStatus, request_view
from inferlab.scheduler_output import SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, waiting: RequestQueue,
                 clock: Callable[[], float] = time.monotonic, num_host_blocks: int = 0) -> None:
        """`num_host_blocks`: the host pool for preemption by swap (unused by recompute)."""
        self.config = config
        self.block_manager = block_manager
        self.waiting = waiting
        self.allocation = ALLOCATIONS[config.kv_allocation](block_manager)
        self.preemption = make_preemption(config.preemption_mode, block_manager, num_host_blocks)
        self.running: list[Request] = []
        self.loads: RemoteLoads | None = None  # with a KV connector: attach_connector
        self.clock = clock
        self.num_preemptions = 0
        self.step_count = 0
        # The token budget of the next step: fixed, or set before each step by the engine's StepBudget
        auto = config.max_num_batched_tokens == "auto"
        self.max_num_batched_tokens: int = START if auto else config.max_num_batched_tokens
        self.last_output = SchedulerOutput()
        self._seq = itertools.count()
        # A queue that keeps the base class's should_preempt never evicts for a waiting request,
        # so the per-step search for a victim can be skipped (it reads every running request).
        self._may_evict_for_waiting = type(waiting).should_preempt is not RequestQueue.should_preempt

    def add_request(self, req: Request) -> None:
        """Queue `req`; raises (changing nothing) if the allocation refuses it."""
        self.allocation.add(req)
        req.seq = next(self._seq)
        req.status = RequestStatus.WAITING
        try:
            self.waiting.push(req)
        except Exception as e:  # a policy's key() failed on it: refused like any request, nothing held
            self.allocation.release(req)
            raise ValueError(f"the scheduling policy refused request {req.request_id!r}: "
                             f"{type(e).__name__}: {e}") from None

    def attach_connector(self, connector: KVConnectorBase) -> None:
        self.loads = RemoteLoads(connector, self.block_manager, self.allocation, self.clock)

    @property
    def loading(self) -> list[Request]:
        """Admitted requests waiting for the connector to load their KV."""
        return self.loads.requests if self.loads is not None else []

    def has_unfinished(self) -> bool:
        return bool(self.running) or bool(self.loading) or len(self.waiting) > 0

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        req.spec_token_ids = []
        self.preemption.preempt(req, out)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        requeue(self.waiting, req)
        out.preempted.append(req)

    @property
    def long_prefill_token_threshold(self) -> int:
        return self.config.long_prefill_token_threshold or self.max_num_batched_tokens

    def _chunk(self, req: Request, num_computed: int, budget: int) -> int:
        return min(req.num_tokens - num_computed, budget, self.long_prefill_token_threshold)

    def _make_room_for_waiting(self, out: SchedulerOutput) -> None:
        """Policies that allow it (priority) evict worse running requests for a better waiting one."""
        bm = self.block_manager
        while self._may_evict_for_waiting and len(self.waiting) and self.running:
            head = head_of(self.waiting)
            victim = pick_victim(self.waiting, self.running)
            if not may_preempt(self.waiting, head, victim):
                return
            done = head.num_computed_tokens  # 0, or what a swapped request brings back
            need = bm.blocks_needed(done + self._chunk(head, done, self.max_num_batched_tokens))
            if len(self.running) < self.config.max_num_seqs and bm.num_free_blocks >= need:
                return
            self._preempt(victim, out)

    def schedule(self) -> SchedulerOutput:
        out = self.last_output = SchedulerOutput()  # kept for the detailed snapshot's batch view
        self.step_count += 1
        budget = self.max_num_batched_tokens
        self._make_room_for_waiting(out)
        made_room = len(out.preempted)
        # This loop runs once per running request per step (millions of times in the simulator),
        # so it reads attributes directly instead of through _chunk and Request's properties.
        threshold = self.long_prefill_token_threshold
        allocate, block_size = self.block_manager.allocate_slots, self.block_manager.block_size
        scheduled, running = out.scheduled, RequestStatus.RUNNING
        for req in by_key(self.waiting, self.running):
            if budget == 0:
                break
            if req.status is not running:
                continue
            # = self._chunk(req, ...), inlined, counting the drafts a decode may carry (speculative decoding)
            n = len(req.token_ids) + len(req.spec_token_ids) - req.num_computed_tokens
            if n > budget:
                n = budget
            if n > threshold and not req.spec_token_ids:  # a long prefill's share, not a decode's drafts
                n = threshold
            if req.spec_token_ids:  # drafts follow a decode's one token: verify those the budget lets in
                del req.spec_token_ids[n - 1:]
            if req.num_computed_tokens + n > len(req.block_table) * block_size:  # else the last block has room
                while not allocate(req, n):
                    if req.spec_token_ids:  # drafts are never worth a preemption: decode without them
                        n -= len(req.spec_token_ids)
                        req.spec_token_ids = []
                        continue
                    taken = {id(r) for r, _ in scheduled}
                    victim = pick_victim(self.waiting, [r for r in self.running if id(r) not in taken])
                    self._preempt(victim, out)
                    if victim is req:
                        break
            if req.status is running:
                scheduled.append((req, n))
                budget -= n
        if len(out.preempted) > made_room:  # running requests ran out of blocks: admitting would thrash
            return out
        while len(self.waiting) and budget > 0 and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            req = head_of(self.waiting)
            computed, num_computed = self.preemption.resume(req)  # prefix-cache hits, or its swapped KV
            if self.loads is not None and self.loads.admit(req, computed, num_computed):
                take(self.waiting, req)
                continue
            n = self._chunk(req, num_computed, budget)
            if not self.block_manager.allocate_slots(req, self.allocation.admit_tokens(req, num_computed, n), computed):
                break  # head-of-line waits for blocks; letting others pass would starve it
            take(self.waiting, req)
            req.num_computed_tokens = num_computed
            self.preemption.resumed(req, out)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self.clock()
                req.num_cached_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        return out

    def finish_loads(self, loaded: dict[str, int]) -> None:
        """Loading requests whose KV is in (`loaded`: request id -> tokens loaded) join the running batch."""
        self.running.extend(self.loads.finish(loaded))

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """Advance computed tokens and append sampled ones. `sampled` maps request_id to the new
        tokens for each request whose scheduled chunk reached the end of its tokens: one, or after
        drafts were verified, the accepted drafts and one more."""
        advanced, running = [], RequestStatus.RUNNING
        for req, n in out.scheduled:
            if req.status is not running:
                continue
            req.num_computed_tokens += n
            advanced.append(req)
            tokens = sampled.get(req.request_id)
            if tokens is not None:
                if req.spec_token_ids:
                    # Only the accepted drafts' K/V is kept: computed tokens roll back past the rejected
                    # ones, and blocks that held nothing else go back to the pool. None of them was
                    # registered in the prefix cache, which the call below does for computed tokens only.
                    req.num_computed_tokens -= len(req.spec_token_ids) + 1 - len(tokens)
                    req.spec_token_ids = []
                    req.token_ids.extend(tokens)
                    self.allocation.trim(req)
                else:
                    req.token_ids.extend(tokens)
                if req.first_token_time is None:
                    req.first_token_time = self.clock()
        # after the appends: caching reads only computed tokens, which an appended one is not
        self.block_manager.cache_new_full_blocks(advanced)

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        if req.status.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING_FOR_REMOTE_KVS:
            self.loads.requests.remove(req)
        else:
            self.waiting.remove(req)
        if self.loads is not None:  # first: a load in flight must not write into freed blocks
            self.loads.connector.request_finished(req)
        self.block_manager.free(req)
        self.preemption.release(req)
        self.allocation.release(req)
        req.status = status

    def live_requests(self) -> list[Request]:
        return self.running + self.loading + list(self.waiting)

    def check_integrity(self) -> None:
        waiting = list(self.waiting)
        # a waiting request with tokens computed keeps them in the host pool (swap): checked there
        holding = self.running + self.loading  # requests holding pool blocks
        self.block_manager.check_integrity(holding + [r for r in waiting if not r.num_computed_tokens])
        self.preemption.check_integrity(waiting)
        self.allocation.check_integrity(holding + waiting)

    def snapshot(self, detail: bool = False) -> dict:
        """A small per-step view for metrics, dashboards and experiments. `detail` adds what a
        dashboard draws: the block grid, every live request and the last step's batch; it costs
        a pass over the pool, so it is computed only when someone asks."""
        snap = {"step": self.step_count, "num_running": len(self.running),
                "num_waiting": len(self.waiting), "num_preemptions": self.num_preemptions,
                "kv": self.block_manager.snapshot(detail), **self.preemption.snapshot(),
                **self.allocation.snapshot()}
        if self.loads is not None:
            snap["num_loading"] = len(self.loading)  # waiting for KV from the connector's store
        if detail:
            snap["batch"] = self.batch_view()
            snap["requests"] = [request_view(r) for r in self.live_requests()]
        return snap

    def batch_view(self) -> dict:
        """The last step's tokens split into prefill and decode, against the budget. Read after the
        step: a one-token chunk past the prompt is a decode (its token was sampled the step before)."""
        out = self.last_output
        decode = sum(1 for r, n in out.scheduled if n == 1 and r.num_computed_tokens > r.num_prompt_tokens)
        return {"prefill": out.num_tokens - decode, "decode": decode, "budget": self.max_num_batched_tokens,
                "seqs": len(out.scheduled), "preempted": len(out.preempted)}

