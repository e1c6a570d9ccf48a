"""KVConnectorBase: vLLM v1's interface for moving KV blocks between an engine's pool and
something outside it (a folder shared by instances on one host, a Redis pool, another instance).

The interface has two sides, as in vLLM. The scheduler side decides what moves and owns no tensor;
the worker side moves bytes in and out of the runner's pool. vLLM builds one object per side in
different processes; here scheduler and runner share a process, so one object plays both roles,
but the sides still talk only through the per-step `KVConnectorMetadata`.

A step with a connector (see `LLMEngine.step`):

    get_finished()              worker: loads done since the last step, their blocks written in
    scheduler.finish_loads(...) those requests leave WAITING_FOR_REMOTE_KVS and run from there
    schedule()                  scheduler, at admission: get_num_new_matched_tokens, then
                                update_state_after_alloc for a request that will load
    build_connector_meta(out)   scheduler: this step's loads to start and blocks to save
    start_load_kv(meta)         worker: start fetching (in the background: the step loop goes on)
    ... the model runs ...
    save_kv(meta)               worker: copy the blocks this step filled out of the pool, store them
    wait_for_save()             worker: before a finished request is returned, its blocks are stored
    request_finished(req)       scheduler: forget the request (finished, aborted or failed)

Keys are the engine's own block hash chain (`block_hash.py`), so a block means the same prefix,
model and cache salt in every instance that shares the store.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from inferlab.request import Request


@dataclass
class KVConnectorMetadata:
    """What the scheduler side tells the worker side for one step."""
    loads: list = field(default_factory=list)  # loads to start, the connector's own records
    saves: list[tuple[str, int, str]] = field(default_factory=list)  # (request id, pool block, key)


@dataclass
class Finished:
    """`get_finished`'s answer: request ids whose transfers are done since the last call."""
    recving: dict[str, int] = field(default_factory=dict)  # request id -> tokens loaded (0: failed)
    sending: set[str] = field(default_factory=set)


class KVConnectorBase(ABC):
    # -- scheduler side ---------------------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, req: Request, num_computed_tokens: int) -> int:
        """Tokens past the `num_computed_tokens` found in the local prefix cache that the connector
        can load for `req` (0: none). Never the request's last token, whose logits must be
        computed. Called when the request is about to be admitted; must not block for long."""

    @abstractmethod
    def update_state_after_alloc(self, req: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """The scheduler gave `req` pool blocks `block_ids` for the `num_external_tokens` the last
        call promised: the load into them starts with the next step's metadata."""

    @abstractmethod
    def build_connector_meta(self, scheduled: list[tuple[Request, int]]) -> KVConnectorMetadata:
        """This step's loads (the requests allocated since the last call) and saves (blocks that
        the `scheduled` chunks fill, for a producer)."""

    @abstractmethod
    def request_finished(self, req: Request) -> None:
        """`req` finished, was aborted or failed: drop its state, and any load still in flight
        (its blocks are about to be freed, so nothing may be written into them any more). vLLM's
        returns whether to hold the blocks for an asynchronous send; saves here copy the blocks
        out in the step that filled them, so the blocks are freed at once."""

    # -- worker side ------------------------------------------------------------------------------
    @abstractmethod
    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        """Start the step's loads. They run in the background; `get_finished` reports them."""

    @abstractmethod
    def save_kv(self, meta: KVConnectorMetadata, failed: set[str]) -> None:
        """After the model ran: store the blocks `meta` lists (not those of requests in `failed`,
        whose step broke). One save per step, not vLLM's per layer: on a CPU a layer is too short
        a piece of work to overlap a copy with."""

    @abstractmethod
    def wait_for_save(self) -> None:
        """Block until every save started is stored or has failed (bounded by the store's
        timeouts, and by the load timeout a consumer would give up after). Called before a finished
        request is returned, so a client told that a prompt is done (a P/D prefill) can rely on its
        blocks being in the store."""

    @abstractmethod
    def get_finished(self) -> Finished:
        """Loads (and sends) that completed since the last call. A completed load's blocks are in
        the pool when this returns; a failed one reports 0 tokens and the request computes them."""

    @abstractmethod
    def wait_for_load(self, timeout: float) -> None:
        """Block up to `timeout` seconds for a load to complete: the engine calls it when only
        loads are pending, so that waiting on the network does not spin a core."""

    def snapshot(self) -> dict:
        return {}

    @abstractmethod
    def close(self) -> None:
        """Stop background work and close the store."""
