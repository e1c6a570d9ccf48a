"""RedisConnector: a network KV pool on a Redis server at `kv_connector_extra_config.url`
(`redis://host:port[/db]`), shared by every instance that points at it, on any host.

Each block is one string value under `inferlab:kv:<model:dtype:shape>/<chain hash>`. Its bytes
are fixed by its key, so a block is written only if absent (SET NX) and any instance may load it.
The pool's size and eviction are Redis's own: run the server with a memory cap and an LRU policy,
e.g. `redis-server --maxmemory 4gb --maxmemory-policy allkeys-lru --save '' --appendonly no` (a
KV cache needs no persistence). An evicted block is simply a miss; since a consumer loads only the
leading run of blocks it finds, evicting a prefix's middle costs the blocks after it too.

Every call has a short socket timeout (`kv_connector_extra_config.timeout`, default 1 s): a Redis
that is down at start is a one-line error, one that dies mid-run is a miss, and a load that trickles
in past `load_timeout` is given up (see `store.py`).
"""
from __future__ import annotations

from inferlab.kv_transfer.store import BlockStore, StoreConnector, StoreFull, seconds

PREFIX = "inferlab:kv:"


class RedisStore(BlockStore):
    def __init__(self, url: str, timeout: float = 1.0) -> None:
        try:
            import redis
        except ImportError:
            raise ValueError("RedisConnector needs the redis package: pip install redis") from None
        self.url = url
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                               health_check_interval=0)
        except ValueError as e:
            raise ValueError(f"bad Redis url {url!r}: {e}") from None

    def check(self) -> None:
        try:
            self.client.ping()
        except Exception as e:  # noqa: BLE001 - connection refused, timeout, auth...
            raise ValueError(f"cannot reach Redis at {self.url}: {e}") from None

    def contains(self, keys: list[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(PREFIX + key)
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: list[str]) -> list[bytes | None]:
        return self.client.mget([PREFIX + k for k in keys]) if keys else []

    def put(self, key: str, value: bytes) -> None:
        import redis
        try:
            self.client.set(PREFIX + key, value, nx=True)
        except redis.exceptions.OutOfMemoryError as e:  # the server answered: full (noeviction), not down
            raise StoreFull(str(e)) from None

    def close(self) -> None:
        self.client.close()


class RedisConnector(StoreConnector):
    def __init__(self, config, runner, block_manager, namespace: str) -> None:
        extra = config.kv_connector_extra_config
        super().__init__(config, RedisStore(extra["url"], seconds(extra, "timeout", 1.0)), runner, block_manager,
                         namespace)
