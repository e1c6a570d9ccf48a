"""The surgery room's comparison code, on the captures of real vLLM committed in
experiments/surgery/captures (no vLLM needed here). InferLab's scheduler is run live on the
same traces with the tiny model: with ignore_eos the schedule does not depend on the model, so
its batches can be held against vLLM's step for step."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

SURGERY = Path(__file__).resolve().parent.parent / "experiments" / "surgery"
sys.path.insert(0, str(SURGERY))
import capture_inferlab  # noqa: E402
import compare  # noqa: E402
from capture_format import expand  # noqa: E402

CAPTURES = SURGERY / "captures"


def fixture(engine: str, scenario: str) -> dict:
    return compare.load(CAPTURES, engine, scenario)


@pytest.fixture(scope="module")
def live(tiny):
    return {name: capture_inferlab.capture(name, loaded=tiny) for name in ("cache", "pressure")}


def test_the_fixtures_are_small_and_from_real_vllm():
    for path in CAPTURES.glob("*.json"):
        assert path.stat().st_size < 8000, path
    assert fixture("vllm", "pressure")["engine"].startswith("vllm 0.32")


def test_recorded_greedy_outputs_are_identical_token_for_token():
    for name in ("cache", "pressure"):
        c = compare.compare(fixture("vllm", name), fixture("inferlab", name))
        assert c["outputs_identical"] and c["first_token_difference"] == [None] * len(c["first_token_difference"])
        assert all(len(o) == fixture("vllm", name)["knobs"]["max_tokens"] for o in fixture("vllm", name)["outputs"])


def test_a_changed_or_missing_token_is_found_where_it_is():
    v, m = fixture("vllm", "cache"), copy.deepcopy(fixture("inferlab", "cache"))
    m["outputs"][2][5] += 1
    m["outputs"][4] = m["outputs"][4][:7]
    c = compare.compare(v, m)
    assert not c["outputs_identical"] and c["first_token_difference"] == [None, None, 5, None, 7, None]
    v, m = fixture("vllm", "pressure"), copy.deepcopy(fixture("inferlab", "pressure"))
    assert compare.compare(v, m)["first_step_difference"] is None
    m["steps"][3]["sched"][1][1] = 2
    assert compare.compare(v, m)["first_step_difference"] == 3
    m["steps"][3]["sched"][1][1] = 1
    m["steps"].pop()
    assert compare.compare(v, m)["first_step_difference"] == len(v["steps"]) - 1


def test_inferlab_schedules_the_pressure_trace_step_for_step_as_vllm_did(live):
    v = fixture("vllm", "pressure")
    c = compare.compare(v, {**live["pressure"], "outputs": v["outputs"]})  # the tiny model's tokens mean nothing
    assert c["identical_steps"] == len(v["steps"]) == len(live["pressure"]["steps"])
    assert c["summary"]["vllm"] == c["summary"]["inferlab"]
    assert c["summary"]["inferlab"]["preemptions"] == 2
    v_steps, m_steps = expand(v["steps"]), expand(live["pressure"]["steps"])
    assert [s["free"] for s in v_steps] == [s["free"] for s in m_steps]  # the pools fill and drain alike
    assert [s["preempted"] for s in v_steps] == [s["preempted"] for s in m_steps]


def test_the_cache_trace_differs_where_vllm_caches_blocks_as_it_schedules_them(live):
    """vLLM registers a block in the prefix cache when it is scheduled (KVCacheManager.allocate_slots
    caches up to the tokens of this step), so a request admitted later in the same step already hits
    the shared prefix another request is computing; InferLab registers blocks once computed."""
    v, m = fixture("vllm", "cache"), live["cache"]
    assert compare.batches(m) == compare.batches(fixture("inferlab", "cache"))  # the live run is the recorded one
    c = compare.compare(v, {**m, "outputs": v["outputs"]})
    assert c["first_step_difference"] == 0
    assert compare.batches(v)[0] == [(0, 90), (1, 6), (2, 32)]  # r1's 64-token prefix: r0's blocks, this very step
    assert compare.batches(m)[0] == [(0, 90), (1, 38)]
    shared = v["knobs"]["shared_prefix"]
    assert c["summary"]["vllm"]["prefix hits"] == 3 * shared and c["summary"]["inferlab"]["prefix hits"] == 2 * shared
    assert c["summary"]["vllm"]["prefix queries"] == c["summary"]["inferlab"]["prefix queries"]
    assert c["summary"]["vllm"]["decode tokens"] == c["summary"]["inferlab"]["decode tokens"]


def test_out_of_kv_memory_messages_side_by_side(tiny):
    v = fixture("vllm", "oom")
    assert v["startup_error"].startswith("ValueError: To serve at least one request with the model's max seq len")
    assert capture_inferlab.capture_oom(loaded=tiny) == fixture("inferlab", "oom")
    report = compare.report(CAPTURES)
    assert "identical, token for token, for every request" in report and v["startup_error"] in report


def test_both_timelines_replay_side_by_side_in_the_scope(tmp_path, make_tiny_engine, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare.py", "--out", str(tmp_path / "r.md"), "--scope", str(tmp_path)])
    compare.main()
    from inferlab.sampling_params import SamplingParams
    from inferlab.scope.recorder import Recorder, read_trace
    from inferlab.scope.replay import build_replay_app
    engine = make_tiny_engine()  # a real recording, to hold the converted frames against
    with Recorder(engine, str(tmp_path / "real.jsonl")):
        engine.add_request("r0", {"prompt_token_ids": list(range(100, 120))}, SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
    real = json.loads(read_trace(str(tmp_path / "real.jsonl"))[1][0])
    paths = [str(tmp_path / f"{e}-pressure.jsonl") for e in ("vllm", "inferlab")]
    for path in paths:
        head, frames = read_trace(path)
        frame = json.loads(frames[10])
        assert set(frame) == set(real) and set(frame["kv"]) == set(real["kv"])
        assert set(frame["requests"][0]) == set(real["requests"][0]) and set(frame["batch"]) == set(real["batch"])
        assert len(frames) == len(fixture("vllm", "pressure")["steps"])
    client = TestClient(build_replay_app(*paths))
    assert client.get("/scope/info?trace=0").json()["engine"].startswith("vllm")
    assert client.get("/scope/info?trace=1").json()["engine"] == "inferlab"
    assert client.get("/scope/trace?trace=1").text.splitlines() == read_trace(paths[1])[1]
    assert client.get("/scope/trace?trace=2").status_code == 404
    beside = client.get("/scope/beside").text
    assert beside.count("<iframe") == 2 and 'src="/scope?trace=1"' in beside
