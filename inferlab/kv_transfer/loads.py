"""The scheduler's side of loading KV from a connector's store: the requests admitted to wait for their
prefix's blocks (WAITING_FOR_REMOTE_KVS, beside the running batch), and their way back into it."""
from __future__ import annotations

from collections.abc import Callable

from inferlab.kv_transfer.base import KVConnectorBase
from inferlab.request import Request, RequestStatus


class RemoteLoads:
    """Requests whose prefix the connector's store holds, each admitted with its blocks allocated and
    kept out of the batch until the connector reports its load done."""

    def __init__(self, connector: KVConnectorBase, block_manager, allocation,
                 clock: Callable[[], float]) -> None:
        self.connector = connector
        self.block_manager = block_manager
        self.allocation = allocation
        self.clock = clock
        self.requests: list[Request] = []

    def admit(self, req: Request, computed: list[int], num_computed: int) -> bool:
        """Admit `req` to wait for the tokens the connector can load past its `num_computed` cached
        ones, its blocks allocated now; False (nothing changed) if there are none, or no room. The
        caller takes an admitted request off its waiting queue."""
        if req.num_computed_tokens or req.computes_prompt:  # swapped back in: its own KV returns from the host
            return False  # pool; a prompt scored (prompt_logprobs) or mean-pooled: every row computed here
        num_external = self.connector.get_num_new_matched_tokens(req, num_computed)
        if not num_external or not self.block_manager.allocate_slots(
                req, self.allocation.admit_tokens(req, num_computed, num_external), computed):
            return False
        req.num_computed_tokens = num_computed
        self.connector.update_state_after_alloc(req, req.block_table[len(computed):], num_external)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock()
        self.requests.append(req)
        return True

    def finish(self, loaded: dict[str, int]) -> list[Request]:
        """The requests whose KV is in (`loaded`: request id -> tokens loaded, 0 if the load failed
        and they compute them), RUNNING again, their full blocks in the prefix cache."""
        done = [r for r in self.requests if r.request_id in loaded]
        for req in done:
            self.requests.remove(req)
            req.num_computed_tokens += loaded[req.request_id]
            if req.first_token_time is None:
                req.num_cached_tokens = req.num_computed_tokens
            self.block_manager.cache_full_blocks(req)
            req.status = RequestStatus.RUNNING
        return done
