"""KV connectors in process: instances sharing prefixes through a folder or Redis, P/D (a producer
computes the prompt, a consumer loads it and computes only its last token), and the faults — a
store down at start, a store killed mid-run, a request aborted while its KV loads."""
from __future__ import annotations

import random
import time

import pytest
from kv_store import redis_server

from inferlab import SamplingParams
from inferlab.kv_transfer import KVTransferConfig
from inferlab.request import RequestStatus

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def prompts(n: int, shared: int, tail: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """`n` prompts that share their first `shared` tokens, each with its own tail."""
    rng = random.Random(seed)
    head = [rng.randrange(100, 40000) for _ in range(shared)]
    return [head + [rng.randrange(100, 40000) for _ in range(rng.randint(*tail))] for _ in range(n)]


def run(engine, batch: list[list[int]], params: SamplingParams = GREEDY) -> dict[str, list[int]]:
    """Each request's output token ids; `run.cached` then holds each one's cached prompt tokens."""
    for i, ids in enumerate(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    outs, cached = {}, {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish"
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
                cached[out.request_id] = out.num_cached_tokens
        engine.check_integrity()
    run.cached = cached
    return outs


def assert_empty(engine) -> None:
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.loading


@pytest.fixture(params=["SharedStorageConnector", "RedisConnector"])
def store(request, tmp_path):
    """A fresh store's kv_connector_extra_config, for each connector."""
    if request.param == "SharedStorageConnector":
        yield request.param, {"shared_storage_path": str(tmp_path / "kv")}
    else:
        with redis_server() as (url, _):
            yield request.param, {"url": url}


def connector(store, role: str = "kv_both") -> dict:
    name, extra = store
    return {"kv_connector": name, "kv_role": role, "kv_connector_extra_config": extra}


def test_instance_b_loads_the_prefix_instance_a_computed(make_tiny_engine, store):
    batch = prompts(4, 22, (3, 9))  # block_size 4: 5 shared blocks, then tails of their own
    single = run(make_tiny_engine(), batch)
    a = make_tiny_engine(kv_transfer_config=connector(store))
    assert run(a, batch[:1]) == {"r0": single["r0"]}
    b = make_tiny_engine(kv_transfer_config=connector(store))
    out = run(b, batch)
    assert out == single
    # r0's whole prompt but its last token came from the store, the others' shared blocks
    assert run.cached["r0"] == len(batch[0]) - 1
    assert all(run.cached[f"r{i}"] >= 20 for i in range(1, 4))
    assert b.snapshot()["kv_transfer"]["hit_tokens"] >= len(batch[0]) - 1 + 20
    assert_empty(a)
    assert_empty(b)


def test_instances_with_other_weights_share_nothing(make_tiny_engine, tmp_path):
    """The store's namespace names the weights as run: a re-quantized model, or int8 activations,
    computes other KV, which another instance must not load as its own."""
    kv = connector(("SharedStorageConnector", {"shared_storage_path": str(tmp_path / "kv")}))
    batch = prompts(2, 20, (3, 6))
    run(make_tiny_engine(kv_transfer_config=kv, int8_activations=True), batch)
    b = make_tiny_engine(kv_transfer_config=kv)
    run(b, batch)
    assert b.snapshot()["kv_transfer"]["hit_tokens"] == 0
    c = make_tiny_engine(kv_transfer_config=kv)  # the same weights as b: b's blocks serve
    run(c, batch)
    assert c.snapshot()["kv_transfer"]["hit_tokens"] > 0


def test_a_producer_saves_its_cached_prefix_again_when_the_store_lost_it(make_tiny_engine, tmp_path):
    """After a store restart (or eviction), blocks the producer still has cached locally are saved
    again when a request hits them: else the consumer computed the whole prompt from then on."""
    import shutil
    folder = tmp_path / "kv"
    kv = connector(("SharedStorageConnector", {"shared_storage_path": str(folder)}))
    batch = prompts(2, 0, (20, 30), seed=3)
    prefill = make_tiny_engine(kv_transfer_config={**kv, "kv_role": "kv_producer"})
    one_token = SamplingParams(max_tokens=1, temperature=0.0)
    run(prefill, batch, one_token)
    shutil.rmtree(folder)
    folder.mkdir()  # the store comes back empty
    run(prefill, batch, one_token)
    assert all(run.cached[f"r{i}"] >= 16 for i in range(2))  # the producer hit its own cache
    decode = make_tiny_engine(kv_transfer_config={**kv, "kv_role": "kv_consumer"})
    run(decode, batch)
    assert decode.num_prompt_tokens == len(batch)  # one token a prompt: its last
    assert_empty(prefill)


def test_pd_consumer_computes_only_the_last_prompt_token(make_tiny_engine, store):
    batch = prompts(5, 0, (5, 30), seed=1)
    single = run(make_tiny_engine(), batch)
    prefill = make_tiny_engine(kv_transfer_config=connector(store, "kv_producer"))
    run(prefill, batch, SamplingParams(max_tokens=1, temperature=0.0))
    decode = make_tiny_engine(kv_transfer_config=connector(store, "kv_consumer"))
    assert run(decode, batch) == single
    assert decode.num_prompt_tokens == len(batch)  # one token a prompt: its last
    assert all(run.cached[f"r{i}"] == len(ids) - 1 for i, ids in enumerate(batch))
    assert decode.snapshot()["kv_transfer"]["saved_blocks"] == 0  # a consumer stores nothing
    assert_empty(prefill)
    assert_empty(decode)


def test_a_consumer_computes_a_prompt_it_is_asked_to_score(make_tiny_engine, tmp_path):
    """prompt_logprobs need every prompt row computed: a P/D consumer loads none of that prompt's
    KV (it used to load it, and the request finished without its prompt logprobs)."""
    kv = connector(("SharedStorageConnector", {"shared_storage_path": str(tmp_path / "kv")}))
    batch = prompts(2, 0, (20, 30), seed=2)
    run(make_tiny_engine(kv_transfer_config={**kv, "kv_role": "kv_producer"}), batch,
        SamplingParams(max_tokens=1, temperature=0.0))
    decode = make_tiny_engine(kv_transfer_config={**kv, "kv_role": "kv_consumer"})
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)
    decode.add_request("s", {"prompt_token_ids": batch[0]}, scored)
    outs = []
    while decode.has_unfinished_requests():
        outs += [o for o in decode.step() if o.finished]
    assert len(outs[0].prompt_logprobs) == len(batch[0]) and outs[0].num_cached_tokens == 0
    run(decode, batch[1:])  # unscored: loaded as before
    assert run.cached["r0"] == len(batch[1]) - 1
    assert_empty(decode)


def test_a_store_down_at_start_is_a_one_line_error(make_tiny_engine, tmp_path):
    from kv_store import free_port
    pytest.importorskip("redis")
    with pytest.raises(ValueError, match="cannot reach Redis at redis://127.0.0.1"):
        make_tiny_engine(kv_transfer_config={"kv_connector": "RedisConnector", "kv_connector_extra_config":
                                             {"url": f"redis://127.0.0.1:{free_port()}", "timeout": 0.5}})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a writable folder"):
        make_tiny_engine(kv_transfer_config={"kv_connector": "SharedStorageConnector", "kv_connector_extra_config":
                                             {"shared_storage_path": str(tmp_path / "file")}})


@pytest.mark.parametrize("text, message", [
    ('{"kv_connector": "Nixl"}', "kv_connector must be one of"),
    ('{"kv_connector": "RedisConnector"}', "RedisConnector needs kv_connector_extra_config.url"),
    ('{"kv_connector": "SharedStorageConnector", "kv_role": "both"}', "kv_role must be one of"),
    ('{"kv_connector": "RedisConnector", "kv_rol": "kv_both"}', "unknown fields"),
    ('{"kv_connector": "RedisConnector", "kv_connector_extra_config": {"url": "redis://h", "load_timout": 2}}',
     r"keys RedisConnector does not take: \['load_timout'\] \(it takes \['url', 'timeout', 'load_timeout'\]\)"),
    ("{not json", "not valid JSON"),
])
def test_bad_kv_transfer_config_is_one_line(text, message):
    with pytest.raises(ValueError, match=message):
        KVTransferConfig.parse(text)


def test_speculation_with_a_connector_is_refused(tmp_path):
    """A step's blocks are saved before its drafts are verified: the two refuse to run together."""
    from inferlab import EngineConfig
    with pytest.raises(ValueError, match="speculative_config and kv_transfer_config do not run together"):
        EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2},
                     kv_transfer_config={"kv_connector": "SharedStorageConnector",
                                         "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)}})


def test_redis_killed_mid_run_falls_back_to_computing(make_tiny_engine):
    batch = prompts(6, 24, (4, 12), seed=2)
    single = run(make_tiny_engine(), batch, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    with redis_server() as (url, proc):
        config = {"kv_connector": "RedisConnector", "kv_connector_extra_config": {"url": url, "timeout": 0.5}}
        run(make_tiny_engine(kv_transfer_config=config), batch[:1])  # the shared prefix is in Redis
        b = make_tiny_engine(kv_transfer_config=config)
        for i, ids in enumerate(batch):
            b.add_request(f"r{i}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=24, temperature=0.0,
                                                                             ignore_eos=True))
        outs, start = {}, time.monotonic()
        while b.has_unfinished_requests():
            if len(outs) == 0 and b.scheduler.step_count == 3:
                proc.kill()  # mid-run: some requests loaded, some generating, later saves fail
                proc.wait()
            for out in b.step():
                if out.finished:
                    outs[out.request_id] = out.outputs[0].token_ids
            b.check_integrity()
            assert time.monotonic() - start < 20, "the engine hung on a dead store"
        assert outs == single
        stats = b.snapshot()["kv_transfer"]
        assert stats["store_errors"] >= 1 and stats["store_up"] is False
        assert_empty(b)
        # while the store is marked down, nothing is even tried: a new request costs no timeout
        t = time.monotonic()
        assert run(b, batch[:1], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))["r0"] == single["r0"]
        assert time.monotonic() - t < 5
        assert_empty(b)


def test_a_load_that_trickles_in_is_given_up_and_the_prompt_computed(make_tiny_engine, tmp_path):
    """A store alive but slow answers within each socket timeout yet takes minutes in all: the load is
    given up after load_timeout, and the request computes its prompt, with the same output."""
    extra = {"shared_storage_path": str(tmp_path), "load_timeout": 0.3}
    config = {"kv_connector": "SharedStorageConnector", "kv_connector_extra_config": extra}
    batch = prompts(1, 0, (30, 30), seed=4)
    single = run(make_tiny_engine(), batch)
    run(make_tiny_engine(kv_transfer_config=config), batch)  # the prompt's blocks are in the store
    b = make_tiny_engine(kv_transfer_config=config)
    store, fetch = b.kv_connector.store, b.kv_connector.store.get
    store.get = lambda keys: (time.sleep(3), fetch(keys))[1]
    start = time.monotonic()
    assert run(b, batch) == single
    assert time.monotonic() - start < 2.5 and run.cached["r0"] == 0
    stats = b.snapshot()["kv_transfer"]
    assert stats["load_failures"] == 1 and stats["store_up"] is False  # a store that slow is left alone a while
    assert_empty(b)
    with pytest.raises(ValueError, match="load_timeout must be a positive number of seconds"):
        make_tiny_engine(kv_transfer_config={**config, "kv_connector_extra_config": {**extra, "load_timeout": 0}})


def test_saves_do_not_wait_behind_loads_given_up(make_tiny_engine, tmp_path, monkeypatch):
    """Loads given up on still trickle in on their threads; saves queued behind them, so once the
    store was tried again every finished request (wait_for_save) held the whole engine until those
    fetches drained: tens of seconds on a slow store, for requests that load nothing."""
    from inferlab.kv_transfer import store as store_module
    monkeypatch.setattr(store_module, "RETRY_S", 0.05)  # the store is tried again at once
    extra = {"shared_storage_path": str(tmp_path), "load_timeout": 0.3}
    config = {"kv_connector": "SharedStorageConnector", "kv_connector_extra_config": extra}
    stored, fresh = prompts(2, 0, (30, 30), seed=5), prompts(1, 0, (40, 40), seed=6)
    run(make_tiny_engine(kv_transfer_config=config), stored)
    b = make_tiny_engine(kv_transfer_config=config)
    fetch = b.kv_connector.store.get
    b.kv_connector.store.get = lambda keys: (time.sleep(4), fetch(keys))[1]
    run(b, stored)  # both loads given up, their fetches still asleep on both load threads
    time.sleep(0.1)  # past the store's down window: saves go to it again
    start = time.monotonic()
    run(b, fresh)
    assert time.monotonic() - start < 2 and b.snapshot()["kv_transfer"]["saved_blocks"] >= 2
    assert_empty(b)


def test_a_full_redis_refuses_saves_but_its_blocks_still_load(make_tiny_engine):
    """Under `noeviction` a full Redis answers writes with an OOM error: saves fail, but the store is
    not down, so what it holds is still found (it was marked down and every lookup missed)."""
    import redis
    a_prompt, b_prompt = prompts(1, 0, (30, 30), seed=5)[0], prompts(1, 0, (30, 30), seed=6)[0]
    single = run(make_tiny_engine(), [a_prompt])
    with redis_server() as (url, _):
        config = {"kv_connector": "RedisConnector", "kv_connector_extra_config": {"url": url}}
        run(make_tiny_engine(kv_transfer_config=config), [a_prompt])  # stored while there is room
        r = redis.Redis.from_url(url)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", r.info("memory")["used_memory"])  # full from now on
        b = make_tiny_engine(kv_transfer_config=config)
        run(b, [b_prompt])  # its saves are refused
        stats = b.snapshot()["kv_transfer"]
        assert stats["save_failures"] >= 1 and stats["store_up"] is True
        assert run(b, [a_prompt]) == single and run.cached["r0"] == len(a_prompt) - 1
        assert_empty(b)


def test_abort_while_loading_frees_the_blocks(make_tiny_engine, tmp_path):
    config = {"kv_connector": "SharedStorageConnector", "kv_connector_extra_config": {"shared_storage_path":
                                                                                      str(tmp_path)}}
    batch = prompts(1, 0, (30, 30), seed=3)
    run(make_tiny_engine(kv_transfer_config=config), batch)
    b = make_tiny_engine(kv_transfer_config=config)
    store, slow = b.kv_connector.store, b.kv_connector.store.get
    store.get = lambda keys: (time.sleep(0.5), slow(keys))[1]
    b.add_request("slow", {"prompt_token_ids": batch[0]}, GREEDY)
    b.add_request("other", {"prompt_token_ids": prompts(1, 0, (7, 7), seed=4)[0]}, GREEDY)
    b.step()
    assert b.requests["slow"].status is RequestStatus.WAITING_FOR_REMOTE_KVS
    assert b.requests["other"].status is RequestStatus.RUNNING  # the step loop does not wait for the load
    b.check_integrity()
    assert b.abort_request("slow").outputs[0].finish_reason == "abort"
    b.check_integrity()
    time.sleep(0.6)  # the fetch returns after the abort: nothing may be written into freed blocks
    while b.has_unfinished_requests():
        b.step()
    assert_empty(b)
