"""Property-based: random add / step / abort sequences never break block accounting.

After every action `check_integrity()` must hold (see the invariant tables in block_manager.py,
radix_cache.py and preemption.py), in every KV mode (prefix cache hash or radix, allocation
paged or reserve, preemption by recompute or swap, with a host pool small enough to fill), and
once every request has finished or been aborted the whole pool, and the host pool, are free again."""
from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from inferlab import SamplingParams
from inferlab.allocation import OutOfKVMemoryError

SHARED = [5, 6, 7, 8, 9, 10, 11, 12, 13]  # a common prefix, so prefix caching is exercised

action = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 16), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 16), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=6, max_size=40),
       policy=st.sampled_from(["fcfs", "priority", "sjf"]),
       num_blocks=st.integers(8, 24), block_size=st.sampled_from([2, 4]),
       budget=st.sampled_from([8, 32, 256]), caching=st.booleans(),
       prefix_cache=st.sampled_from(["hash", "radix"]), allocation=st.sampled_from(["paged", "paged", "reserve"]),
       preemption=st.sampled_from(["recompute", "swap"]), host_blocks=st.sampled_from([2, 8, 64]))
def test_random_traffic_keeps_invariants(make_tiny_engine, actions, policy, num_blocks, block_size, budget,
                                         caching, prefix_cache, allocation, preemption, host_blocks):
    engine = make_tiny_engine(num_kv_blocks=num_blocks, block_size=block_size, scheduling_policy=policy,
                              max_num_batched_tokens=budget, long_prefill_token_threshold=max(2, budget // 2),
                              enable_prefix_caching=caching, max_num_seqs=6, prefix_cache=prefix_cache,
                              kv_allocation=allocation, preemption_mode=preemption,
                              swap_space=host_blocks * 128 * block_size / 2**30)  # the tiny model: 128 B a token
    assert engine.host_pool.num_blocks == host_blocks
    ids: list[str] = []
    finished: set[str] = set()
    for i, act in enumerate(actions):
        if act[0] == "add":
            _, n, max_tokens, prio, shared = act
            prompt = (SHARED if shared else []) + [100 + (i * 7 + k) % 500 for k in range(n)]
            rid = f"r{i}"
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            try:
                engine.add_request(rid, {"prompt_token_ids": prompt}, params, priority=prio)
            except OutOfKVMemoryError:  # reserve: only when the reservations would exceed the pool
                reserve = len(prompt) + min(max_tokens, engine.max_request_tokens - len(prompt))
                assert engine.scheduler.allocation.reserved + -(-reserve // block_size) > num_blocks
                continue
            except ValueError as e:  # refused up front, touching nothing, only when it cannot fit
                assert len(prompt) >= engine.max_request_tokens, e
                continue
            ids.append(rid)
        elif act[0] == "step":
            for _ in range(act[1]):
                finished.update(o.request_id for o in engine.step() if o.finished)
                engine.check_integrity()
        elif ids:
            rid = ids[act[1] % len(ids)]
            engine.abort_request(rid)
            finished.add(rid)
        engine.check_integrity()
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        finished.update(o.request_id for o in engine.step() if o.finished)
        engine.check_integrity()
    event(f"preempted: {engine.scheduler.num_preemptions > 0}")
    event(f"swapped: {engine.scheduler.preemption.snapshot().get('swapped_in', 0) > 0}")
    event(f"evicted: {engine.block_manager.evictions > 0}")
    event(f"prefix hits: {engine.block_manager.prefix_hits > 0}")
    assert not engine.has_unfinished_requests(), "requests never finished"
    assert finished == set(ids)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert engine.scheduler.preemption.snapshot().get("host_free", 0) == engine.scheduler.preemption.snapshot().get(
        "host_blocks", 0)
