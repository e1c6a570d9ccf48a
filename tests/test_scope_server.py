"""The live dashboard's server side on a tiny random model: the lab panel's bursts (prefix sharing,
preemption under the priority policy, bad input refused in one line with nothing leaked) and the
SSE feed (frames as requests run, nothing watching once the viewer leaves, resuming on reconnect)."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_server import running_server


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny, num_kv_blocks=64, block_size=4, scheduling_policy="priority") as s:
        yield s


def lab(server, **burst) -> httpx.Response:
    return httpx.post(f"{server.url}/scope/lab", json=burst, timeout=30)


def frames(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_lab_bursts_share_the_system_prompt(server):
    before = server.wait_idle()
    r = lab(server, count=1, prompt_len=32, output_len=4)
    assert r.status_code == 200 and len(r.json()["request_ids"]) == 1
    server.wait_idle()
    r = lab(server, count=3, prompt_len=32, output_len=4)
    ids = r.json()["request_ids"]
    assert len(ids) == 3 and all(i.startswith("lab-") for i in ids)
    m = server.wait_idle(lambda m: m["inferlab:generation_tokens_total"] >= before["inferlab:generation_tokens_total"]
                         + 16)
    hits = m["inferlab:prefix_cache_hits_total"] - before["inferlab:prefix_cache_hits_total"]
    assert hits >= 3 * 24  # the shared 3/4 of each prompt came from the first burst's cached blocks
    server.check_engine()


def test_lab_bursts_preempt_lower_priority(server):
    before = server.wait_idle()
    assert lab(server, count=6, prompt_len=16, output_len=40, priority=5, shared_prefix=False).status_code == 200
    assert lab(server, count=2, prompt_len=16, output_len=40, priority=0, shared_prefix=False).status_code == 200
    m = server.wait_idle(lambda m: m["inferlab:generation_tokens_total"] >= before["inferlab:generation_tokens_total"]
                         + 8 * 40)
    assert m["inferlab:num_preemptions_total"] > before["inferlab:num_preemptions_total"]
    server.check_engine()


@pytest.mark.parametrize("body,message", [
    ({"count": 0}, "count: Input should be greater than or equal to 1"),
    ({"count": 100000}, "count: Input should be less than or equal to 256"),
    ({"output_len": 0}, "output_len: Input should be greater than or equal to 1"),
    ({"priority": "high"}, "priority: Input should be a valid integer"),
    ({"count": "2"}, "count: Input should be a valid integer"),  # strict, as the API's fields
    ({"count": True}, "count: Input should be a valid integer"),
    ({"shared_prefix": "no"}, "shared_prefix: Input should be a valid boolean"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"prompt_len": 10**9}, "prompt_len + output_len = 1000000064 tokens: this engine holds at most 256"),
    ({"output_len": 10**22}, "prompt_len + output_len = 10000000000000000000128 tokens"),
    ("[1, 2", "the request body is not valid JSON"),
])
def test_lab_refuses_bad_bursts_in_one_line(server, body, message):
    if isinstance(body, str):
        r = httpx.post(f"{server.url}/scope/lab", content=body, headers={"Content-Type": "application/json"})
    else:
        r = lab(server, **body)
    assert r.status_code == 400
    error = r.json()["error"]["message"]
    assert error.startswith(message) and "\n" not in error
    server.wait_idle()
    server.check_engine()


def test_lab_requests_are_bounded_and_cancelled_at_once(server):
    before = server.wait_idle()
    first = lab(server, count=200, prompt_len=4, output_len=200, shared_prefix=False)
    assert first.status_code == 200 and len(first.json()["request_ids"]) == 200
    more = lab(server, count=100, prompt_len=4, output_len=8)
    assert more.status_code == 400 and "lab requests are still running" in more.json()["error"]["message"]
    r = httpx.delete(f"{server.url}/scope/lab", timeout=30)
    cancelled = r.json()["cancelled"]
    assert r.status_code == 200 and 0 < cancelled <= 200
    aborted = 'inferlab:request_success_total{finished_reason="abort"}'
    m = server.wait_idle(lambda m: m[aborted] - before[aborted] == cancelled)
    assert m["inferlab:generation_tokens_total"] - before["inferlab:generation_tokens_total"] < 200 * 200
    server.check_engine()
    assert lab(server, count=100, prompt_len=4, output_len=8).status_code == 200  # room again
    server.wait_idle()


def test_two_bursts_at_once_stay_within_the_cap(server):
    """A burst's requests went in one a step, counted as each went in: a second burst sent meanwhile
    passed the check too, and two of 200 ran 400 at once."""
    before = server.wait_idle()
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(
        lab(server, count=200, prompt_len=4, output_len=200, shared_prefix=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 400]
    r = httpx.delete(f"{server.url}/scope/lab", timeout=30)
    cancelled = r.json()["cancelled"]
    assert 0 < cancelled <= 200
    aborted = 'inferlab:request_success_total{finished_reason="abort"}'
    server.wait_idle(lambda m: m[aborted] - before[aborted] == cancelled)
    server.check_engine()


def test_viewer_sees_requests_run_and_resumes_after_reconnect(server):
    server.wait_idle()
    core = server.engine.engine
    with httpx.stream("GET", f"{server.url}/scope/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        stream = frames(r)
        first = next(stream)
        assert first["requests"] == [] and sum(n for _, n in first["kv"]["cells"]) == 64
        assert len(core.step_observers) == 1  # the feed watches only while someone views
        lab(server, count=3, prompt_len=20, output_len=30, shared_prefix=False)
        records, running, deadline = [], set(), time.monotonic() + 60
        for frame in stream:  # frames come at most five a second, but carry a record of every step
            records += [s for s in frame["steps"] if s[0] > first["step"]]
            running |= {r["id"] for r in frame["requests"] if r["state"] == "running" and r["blocks"]}
            if sum(s[3] for s in records) == 3 * 29 and frame["num_running"] == frame["num_waiting"] == 0:
                break
            assert time.monotonic() < deadline, f"the burst did not finish in the frames: {records[-3:]}"
        steps = [s[0] for s in records]
        assert steps == list(range(first["step"] + 1, first["step"] + 1 + len(steps)))  # every step, once
        assert sum(s[2] for s in records) == 3 * 20  # prefill tokens: the three prompts; decodes: 29 each
        assert running and all(rid.startswith("lab-") for rid in running)
    deadline = time.monotonic() + 10
    while core.step_observers:  # the viewer left: the engine goes back to doing no snapshot work
        assert time.monotonic() < deadline, "the feed still watches after its viewer left"
        time.sleep(0.05)
    with httpx.stream("GET", f"{server.url}/scope/events", timeout=30) as r:
        again = next(frames(r))
        assert steps[-1] in [s[0] for s in again["steps"]]  # the timeline resumes where it was
        assert again["step"] >= steps[-1]


def test_idle_viewers_share_frames_and_get_keep_alives(server, monkeypatch):
    """However many watch an idle engine, no frame is built per viewer: each gets the one it joined
    with, then keep-alive comments once a second (a frame only if something changed)."""
    from inferlab.scope.frames import FrameBuilder
    server.wait_idle()
    built = []
    real = FrameBuilder.frame
    monkeypatch.setattr(FrameBuilder, "frame", lambda self, *a, **kw: built.append(1) or real(self, *a, **kw))
    viewers, stop = 12, threading.Event()
    lines: list[list[str]] = [[] for _ in range(viewers)]

    def watch(seen: list[str]) -> None:
        with httpx.stream("GET", f"{server.url}/scope/events", timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    seen.append(line[:5])
                if stop.is_set():
                    return

    threads = [threading.Thread(target=watch, args=(seen,), daemon=True) for seen in lines]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not all(seen for seen in lines):
        assert time.monotonic() < deadline, "not every viewer got its first frame"
        time.sleep(0.05)
    joined = len(built)
    time.sleep(3.5)  # three ticks with nothing happening
    stop.set()
    for t in threads:
        t.join(30)
    assert joined == viewers and len(built) == viewers  # one frame each to join; none since
    for seen in lines:
        assert seen[0] == "data:" and seen[1:].count(": kee") >= 2 and "data:" not in seen[1:], seen
