"""Scheduling policies on the real scheduler: order, preemption, starvation freedom."""
from __future__ import annotations

from conftest import FakeClock

from inferlab import SamplingParams


def params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def run(engine, clock=None, limit=5000) -> tuple[list[str], dict[str, list[int]]]:
    """Step to the end; returns finish order and each request's tokens."""
    order, tokens = [], {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                tokens[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
        if clock is not None:
            clock.now += 1.0
    return order, tokens


def prompt(seed: int, n: int = 12) -> dict:
    return {"prompt_token_ids": [200 + (seed * 13 + k) % 900 for k in range(n)]}


def test_fcfs_serves_in_arrival_order(make_tiny_engine):
    engine = make_tiny_engine(max_num_seqs=1)
    for i in range(4):
        engine.add_request(f"r{i}", prompt(i), params(5))
    assert run(engine)[0] == ["r0", "r1", "r2", "r3"]


def test_priority_order_respected(make_tiny_engine):
    engine = make_tiny_engine(max_num_seqs=1, scheduling_policy="priority")
    for i, prio in enumerate([3, 1, 2, 0]):
        engine.add_request(f"p{prio}", prompt(i), params(4), priority=prio)
    assert run(engine)[0] == ["p0", "p1", "p2", "p3"]


def test_priority_preempts_lower_priority_running_request(make_tiny_engine):
    alone = make_tiny_engine(max_num_seqs=1, scheduling_policy="priority")
    alone.add_request("low", prompt(1), params(20), priority=5)
    expected = run(alone)[1]["low"]

    engine = make_tiny_engine(max_num_seqs=1, scheduling_policy="priority")
    engine.add_request("low", prompt(1), params(20), priority=5)
    for _ in range(6):
        engine.step()
    engine.add_request("high", prompt(2), params(5), priority=0)
    order, tokens = run(engine)
    assert engine.scheduler.num_preemptions >= 1
    assert order == ["high", "low"]
    assert tokens["low"] == expected  # came back after preemption and finished identically


def test_fcfs_never_preempts_for_waiting_requests(make_tiny_engine):
    engine = make_tiny_engine(max_num_seqs=1)  # fcfs
    engine.add_request("first", prompt(1), params(10), priority=5)
    engine.step()
    engine.add_request("second", prompt(2), params(3), priority=0)
    assert run(engine)[0] == ["first", "second"]
    assert engine.scheduler.num_preemptions == 0


def test_preempted_request_keeps_its_place(make_tiny_engine):
    # 10 blocks of 4: a and b fill the pool as they grow, so b (the newer) is preempted;
    # c arrived later and must not overtake b.
    engine = make_tiny_engine(num_kv_blocks=10, block_size=4, max_num_seqs=2)
    engine.add_request("a", prompt(1, 12), params(20))
    engine.add_request("b", prompt(2, 12), params(20))
    engine.add_request("c", prompt(3, 12), params(20))
    order, _ = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert order == ["a", "b", "c"]


def test_sjf_serves_short_jobs_first(make_tiny_engine):
    engine = make_tiny_engine(max_num_seqs=1, scheduling_policy="sjf")
    engine.add_request("long", prompt(1, 40), params(30))
    engine.add_request("mid", prompt(2, 12), params(10))
    engine.add_request("short", prompt(3, 4), params(2))
    assert run(engine)[0] == ["short", "mid", "long"]


def _stream_of_short_jobs(make_tiny_engine, aging_rate: float, steps: int) -> bool:
    """A long job waits while a short job arrives every step; True if the long one finished."""
    clock = FakeClock()
    engine = make_tiny_engine(clock=clock, max_num_seqs=1, scheduling_policy="sjf", sjf_aging_rate=aging_rate)
    engine.add_request("long", prompt(0, 30), params(20))
    engine.add_request("short-0", prompt(1, 4), params(2))
    engine.step()
    for i in range(1, steps):
        clock.now += 1.0
        engine.add_request(f"short-{i}", prompt(i, 4), params(2))
        for out in engine.step():
            if out.request_id == "long" and out.finished:
                return True
    return False


def test_sjf_aging_lets_a_long_job_finish_under_a_stream_of_short_ones(make_tiny_engine):
    assert _stream_of_short_jobs(make_tiny_engine, aging_rate=20.0, steps=300)


def test_sjf_without_aging_starves_the_long_job(make_tiny_engine):
    # the control: pure shortest-job-first never gets to the long job
    assert not _stream_of_short_jobs(make_tiny_engine, aging_rate=0.0, steps=300)


def test_a_queue_keeps_its_order_through_removals_and_removes_without_rebuilding_each_time(monkeypatch):
    """Removal leaves a dead entry that pop and peek skip: the queue orders what is left as a sorted
    list would, re-queued requests included. Rebuilding the heap at each removal made a client that went
    away from 16,000 queued choices hold every step for seconds (O(N^2))."""
    import heapq
    import random

    from inferlab.policy import PriorityQueue
    from inferlab.request import Request
    rebuilds = []
    real_heapify = heapq.heapify
    monkeypatch.setattr(heapq, "heapify", lambda h: (rebuilds.append(len(h)), real_heapify(h)))
    rng = random.Random(0)
    queue, reference = PriorityQueue(), []
    reqs = [Request(f"r{i}", [1], SamplingParams(), arrival_time=float(i), seq=i, priority=rng.randrange(5))
            for i in range(4000)]
    for req in reqs:
        queue.push(req)
        reference.append(req)
    for req in rng.sample(reqs, 3000):
        queue.remove(req)
        reference.remove(req)
    for req in rng.sample(reqs, 50):  # some back in the queue, once removed or not
        if req in reference:
            queue.remove(req)
            reference.remove(req)
        queue.push(req)
        reference.append(req)
    reference.sort(key=queue.key)
    assert len(queue) == len(reference) and list(queue) == reference
    assert queue.peek() is reference[0]
    assert [queue.pop() for _ in range(len(reference))] == reference and len(queue) == 0
    assert len(rebuilds) < 10  # amortized: a compaction after half the entries died, not one per removal
