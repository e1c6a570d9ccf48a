"""StoreConnector: a KV connector over a key-value store of blocks, and the store interface that
`SharedStorageConnector` (files) and `RedisConnector` (a Redis server) fill in.

A block is stored under the engine's hash-chain key of its prefix, behind a namespace naming the
model, its dtype, its weights and the pool's block shape, as the raw bytes of one pool block. A
producer saves every full block its requests compute (and local prefix-cache hits the store lacks),
and a prompt's last, partial block under the key of those tokens, so that a consumer handed the
same prompt loads all of it and computes only its last token. A consumer loads the longest run of
stored blocks past its local prefix-cache hits.

The store is a cache, never a dependency. Every store call runs with short timeouts; a failed one
marks the store down for RETRY_S seconds, during which lookups find nothing and saves are
skipped, so a store that dies mid-run costs a request its hits (it computes them), never its
answer, and no call waits on a dead store more than once a period.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from inferlab.block_hash import block_hash
from inferlab.block_manager import BlockManager
from inferlab.kv_transfer.base import Finished, KVConnectorBase, KVConnectorMetadata
from inferlab.kv_transfer.config import KVTransferConfig
from inferlab.request import Request

log = logging.getLogger("inferlab")

RETRY_S = 5.0  # after a store error, how long the store is treated as down before it is tried again
# A load still running after this long is given up (kv_connector_extra_config.load_timeout): its
# request computes the prompt. A socket timeout bounds each read, not a reply that trickles in.
LOAD_TIMEOUT_S = 5.0


def seconds(extra: dict, key: str, default: float) -> float:
    """kv_connector_extra_config[key], a positive number of seconds (`default` where not given)."""
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"kv_connector_extra_config.{key} must be a positive number of seconds, got {value!r}")
    return value


class StoreFull(Exception):
    """The store answered, but refused a write for want of room (Redis under `noeviction`): a failed
    save, not a store that is down, so lookups go on."""


class BlockStore:
    """Bytes by key. Methods may raise on any store failure (the connector turns that into misses)."""

    def check(self) -> None:
        """Raise ValueError (one line) if the store cannot be used: called once at start."""

    def contains(self, keys: list[str]) -> list[bool]:
        raise NotImplementedError

    def get(self, keys: list[str]) -> list[bytes | None]:
        raise NotImplementedError

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass
class Load:
    req: Request
    keys: list[str]  # the stored blocks to load, in order
    block_ids: list[int]  # the pool blocks they go into
    num_tokens: int  # tokens they hold for this request (the last block may be loaded only in part)


class StoreConnector(KVConnectorBase):
    def __init__(self, config: KVTransferConfig, store: BlockStore, runner, block_manager: BlockManager,
                 namespace: str) -> None:
        """`runner`: has `read_blocks` / `write_blocks` (the ModelRunner); `namespace`: the model,
        dtype, weights and block shape, so that stores shared by other models never mix their blocks."""
        self.config, self.store, self.runner, self.block_manager = config, store, runner, block_manager
        self.namespace = namespace
        self.block_size = block_manager.block_size
        # loads and saves on threads of their own: a save (which a finished request waits on) never
        # queues behind fetches given up on, which may trickle on long after their load_timeout
        self.load_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inferlab-kv-load")
        self.save_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inferlab-kv-save")
        self.load_timeout = seconds(config.kv_connector_extra_config, "load_timeout", LOAD_TIMEOUT_S)
        self.down_until = 0.0
        self.full_logged = False
        self._matched: dict[str, tuple[list[str], int]] = {}  # request id -> (keys, tokens) of its last lookup
        self._pending: list[Load] = []  # allocated, to be started by the next step's metadata
        self._loading: dict[str, tuple[Load, Future, float]] = {}  # request id -> (load, fetch, its start)
        self._saving: list[Future] = []
        self._saved: dict[str, int] = {}  # request id -> blocks stored (or known stored) so far
        self._chains: dict[str, list[bytes]] = {}  # request id -> hash chain of its full blocks
        self.stats = dict.fromkeys(("lookups", "hit_tokens", "loaded_blocks", "load_failures", "saved_blocks",
                                    "save_failures", "store_errors"), 0)
        store.check()

    # -- keys -------------------------------------------------------------------------------------
    def _chain(self, req: Request, num_blocks: int) -> list[bytes]:
        chain = self._chains.setdefault(req.request_id, [])
        bs = self.block_size
        for i in range(len(chain), num_blocks):
            extra = b"" if chain else self.block_manager.first_block_extra(req)
            chain.append(block_hash(chain[-1] if chain else None, req.token_ids[i * bs:(i + 1) * bs], extra))
        return chain[:num_blocks]

    def _key(self, h: bytes) -> str:
        return f"{self.namespace}/{h.hex()}"

    def _prompt_keys(self, req: Request) -> tuple[list[str], list[int]]:
        """Keys of the blocks holding `req`'s tokens: its full blocks, then its partial last one;
        and the tokens each holds."""
        bs, n = self.block_size, req.num_tokens
        full = n // bs
        hashes = self._chain(req, full)
        keys, counts = [self._key(h) for h in hashes], [bs] * full
        if n % bs:
            extra = b"" if full else self.block_manager.first_block_extra(req)
            keys.append(self._key(block_hash(hashes[-1] if full else None, req.token_ids[full * bs:n], extra)))
            counts.append(n % bs)
        return keys, counts

    # -- store calls, guarded ---------------------------------------------------------------------
    def _up(self) -> bool:
        return time.monotonic() >= self.down_until

    def _failed(self, what: str, e: Exception) -> None:
        self.stats["store_errors"] += 1
        if self._up():
            log.warning("KV store %s failed (%s: %s); computing locally for %.0f s", what, type(e).__name__, e,
                        RETRY_S)
        self.down_until = time.monotonic() + RETRY_S

    # -- scheduler side ---------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, req: Request, num_computed_tokens: int) -> int:
        if not self.config.is_consumer or not self._up() or num_computed_tokens >= req.num_tokens - 1:
            return 0
        keys, counts = self._prompt_keys(req)
        first = num_computed_tokens // self.block_size
        self.stats["lookups"] += 1
        try:
            present = self.store.contains(keys[first:])
        except Exception as e:  # noqa: BLE001 - any store failure is a miss
            self._failed("lookup", e)
            return 0
        run = next((i for i, p in enumerate(present) if not p), len(present))
        tokens = min(sum(counts[first:first + run]), req.num_tokens - 1 - num_computed_tokens)
        if tokens <= 0:
            return 0
        self._matched[req.request_id] = (keys[first:first + -(-tokens // self.block_size)], tokens)
        return tokens

    def update_state_after_alloc(self, req: Request, block_ids: list[int], num_external_tokens: int) -> None:
        keys, tokens = self._matched.pop(req.request_id)
        assert tokens == num_external_tokens, "allocated for another lookup than the last one"
        self._pending.append(Load(req, keys, block_ids[:len(keys)], tokens))

    def build_connector_meta(self, scheduled: list[tuple[Request, int]]) -> KVConnectorMetadata:
        meta = KVConnectorMetadata(loads=self._pending)
        self._pending = []
        if not self.config.is_producer or not self._up():
            return meta
        bs = self.block_size
        for req, n in scheduled:
            end = req.num_computed_tokens + n
            done = self._saved.get(req.request_id)
            if done is None:
                done = self._stored_run(req, req.num_computed_tokens // bs)
            full = end // bs
            hashes = self._chain(req, full)
            meta.saves += [(req.request_id, req.block_table[i], self._key(hashes[i])) for i in range(done, full)]
            self._saved[req.request_id] = max(done, full)
            # the prompt's partial last block, in the step that completes a (first) prefill
            num_prompt = req.num_prompt_tokens
            if num_prompt % bs and req.num_computed_tokens < num_prompt == end == req.num_tokens:
                meta.saves.append((req.request_id, req.block_table[num_prompt // bs], self._prompt_keys(req)[0][-1]))
        return meta

    def _stored_run(self, req: Request, cached: int) -> int:
        """How many of `req`'s first `cached` blocks, local prefix-cache hits, the store holds in a
        row: the rest are saved again. A store that was restarted or evicted them would otherwise
        never get a hot prefix back from the instance that keeps it cached. One store lookup for each
        request that hits the local cache, on the engine thread."""
        if not cached:
            return 0
        try:
            present = self.store.contains([self._key(h) for h in self._chain(req, cached)])
        except Exception as e:  # noqa: BLE001 - a store failure: save nothing more than before
            self._failed("lookup", e)
            return cached
        return next((i for i, p in enumerate(present) if not p), cached)

    def request_finished(self, req: Request) -> None:
        rid = req.request_id
        self._matched.pop(rid, None)
        self._pending = [load for load in self._pending if load.req is not req]
        self._loading.pop(rid, None)  # a fetch still running is ignored when it returns
        self._saved.pop(rid, None)
        self._chains.pop(rid, None)

    # -- worker side ------------------------------------------------------------------------------
    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        for load in meta.loads:
            self._loading[load.req.request_id] = (load, self.load_pool.submit(self.store.get, load.keys),
                                                  time.monotonic())

    def get_finished(self) -> Finished:
        finished = Finished()
        for rid, (load, fut, start) in list(self._loading.items()):
            if fut.done():
                del self._loading[rid]
                finished.recving[rid] = self._write(load, fut)
            elif time.monotonic() - start > self.load_timeout:  # given up: the fetch's late answer is dropped
                del self._loading[rid]
                self.stats["load_failures"] += 1
                self._failed("load", TimeoutError(f"no whole answer in {self.load_timeout} s"))
                finished.recving[rid] = 0
        return finished

    def _write(self, load: Load, fut: Future) -> int:
        """Write the leading run of fetched blocks into the pool; the tokens they give the request."""
        try:
            values = fut.result()
        except Exception as e:  # noqa: BLE001
            self._failed("load", e)
            values = []
        pool = self.runner.kv_cache  # (parts, layers, blocks, *one block's slots)
        shape = (*pool.shape[:2], *pool.shape[3:])
        size = torch.Size(shape).numel() * pool.element_size()
        blocks = []
        for value in values:
            if value is None or len(value) != size:  # evicted meanwhile, or written by another layout
                break
            blocks.append(torch.frombuffer(bytearray(value), dtype=torch.uint8).view(pool.dtype).view(shape))
        if blocks:
            self.runner.write_blocks(load.block_ids[:len(blocks)], torch.stack(blocks))
        self.stats["loaded_blocks"] += len(blocks)
        if len(blocks) < len(load.keys):
            self.stats["load_failures"] += 1
        tokens = min(len(blocks) * self.block_size, load.num_tokens)
        self.stats["hit_tokens"] += tokens
        return tokens

    def wait_for_load(self, timeout: float) -> None:
        if self._loading:
            wait([fut for _, fut, _ in self._loading.values()], timeout, return_when=FIRST_COMPLETED)

    def save_kv(self, meta: KVConnectorMetadata, failed: set[str]) -> None:
        saves = [(block, key) for rid, block, key in meta.saves if rid not in failed]
        if not saves:
            return
        data = self.runner.read_blocks([block for block, _ in saves])  # a copy: the pool may change after
        self._saving = [fut for fut in self._saving if not fut.done()]
        for (_, key), block in zip(saves, data):
            value = block.contiguous().view(torch.uint8).numpy().tobytes()
            self._saving.append(self.save_pool.submit(self._put, key, value))

    def _put(self, key: str, value: bytes) -> None:
        if not self._up():  # queued before the store was found down: dropped, not waited on
            self.stats["save_failures"] += 1
            return
        try:
            self.store.put(key, value)
            self.stats["saved_blocks"] += 1
        except StoreFull as e:
            self.stats["save_failures"] += 1
            if not self.full_logged:
                log.warning("KV store full (%s): blocks not saved; what it holds is still loaded", e)
                self.full_logged = True
        except Exception as e:  # noqa: BLE001
            self.stats["save_failures"] += 1
            self._failed("save", e)

    def wait_for_save(self) -> None:
        """At most load_timeout: a consumer gives up on a load that takes longer anyway, and a slow
        store must not stop the other requests' steps (the saves left go on in the background)."""
        self._saving = list(wait(self._saving, self.load_timeout).not_done)

    def snapshot(self) -> dict:
        return {"kv_transfer": {**self.stats, "loading": len(self._loading) + len(self._pending),
                                "store_up": self._up()}}

    def close(self) -> None:
        for pool in (self.load_pool, self.save_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
