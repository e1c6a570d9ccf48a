"""The oscilloscope's data: the detailed snapshot against the pool it describes, the batch split,
recording (one frame per step, nothing watching once closed), trace reading, replay serving and
`--record` / `inferlab scope` on the command line. The dashboard itself is in test_scope_browser.py."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from test_cli import inferlab

from inferlab.cli import main
from inferlab.sampling_params import SamplingParams
from inferlab.scope.recorder import Recorder, read_trace
from inferlab.scope.replay import build_replay_app

PREFIX = list(range(300, 316))  # four blocks of 4 tokens


def expand(kv: dict) -> tuple[list[int], dict[int, str]]:
    """The grid's run-length cells and hash runs, one entry per block."""
    states = [s for s, count in kv["cells"] for _ in range(count)]
    hashes = {first + k: digits[6 * k:6 * k + 6] for first, digits in kv["hashes"] for k in range(len(digits) // 6)}
    return states, hashes


def check_snapshot(engine) -> dict:
    """The detailed snapshot says exactly what the block manager and the live requests hold."""
    snap = engine.snapshot(detail=True)
    bm = engine.block_manager
    states, hashes = expand(snap["kv"])
    assert len(states) == bm.num_blocks
    for block, state in zip(bm.blocks, states):
        free = block.ref_count == 0
        assert state == (block.ref_count if not free else -1 if block.hash is not None else 0)
        assert hashes.get(block.block_id) == (None if block.hash is None else block.hash[:3].hex())
    live = {r.request_id: r for r in engine.scheduler.live_requests()}
    assert {r["id"] for r in snap["requests"]} == set(live)
    for view in snap["requests"]:
        req = live[view["id"]]
        assert [b for first, n in view["blocks"] for b in range(first, first + n)] == req.block_table
        assert (view["state"], view["computed"], view["prompt"], view["output"], view["priority"]) == \
               (req.status.value, req.num_computed_tokens, req.num_prompt_tokens, req.num_output_tokens, req.priority)
    assert snap["kv"]["shared"] == sum(1 for s in states if s > 1)
    return snap


def run(engine, snapshots: list | None = None) -> None:
    while engine.has_unfinished_requests():
        engine.step()
        snap = check_snapshot(engine)
        if snapshots is not None:
            snapshots.append(snap)


def test_detailed_snapshot_shows_owners_shared_and_cached_blocks(make_tiny_engine):
    engine = make_tiny_engine()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("a", PREFIX + [1000], params)
    run(engine)
    snap = check_snapshot(engine)
    states, _ = expand(snap["kv"])
    assert states.count(-1) == 4 and snap["requests"] == []  # a's full blocks stay cached after it ends
    engine.add_request("b", PREFIX + [1001, 1002], params)
    engine.add_request("c", PREFIX + [1003], params, priority=2)
    engine.step()
    snap = check_snapshot(engine)
    states, hashes = expand(snap["kv"])
    assert states.count(2) == 4 and snap["kv"]["shared"] == 4  # b and c share a's cached prefix
    shared = [i for i, s in enumerate(states) if s == 2]
    assert all(i in hashes for i in shared)
    c = next(r for r in snap["requests"] if r["id"] == "c")
    assert c["priority"] == 2 and c["blocks"][0] == [shared[0], 4]
    run(engine)


def test_batch_view_splits_prefill_from_decode(make_tiny_engine):
    engine = make_tiny_engine(max_num_batched_tokens=8, long_prefill_token_threshold=8)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("a", list(range(400, 405)), params)
    engine.step()
    assert engine.snapshot(detail=True)["batch"] == {"prefill": 5, "decode": 0, "budget": 8, "seqs": 1,
                                                     "preempted": 0}
    engine.add_request("b", list(range(500, 520)), params)  # 20 tokens: chunked beside a's decode
    engine.step()
    assert engine.snapshot(detail=True)["batch"] == {"prefill": 7, "decode": 1, "budget": 8, "seqs": 2,
                                                     "preempted": 0}
    run(engine)


def test_preemption_shows_in_the_snapshot(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=8)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(600 + 10 * i, 608 + 10 * i)), params)
    snapshots: list[dict] = []
    run(engine, snapshots)
    assert any(s["batch"]["preempted"] for s in snapshots)
    assert any(r["state"] == "preempted" for s in snapshots for r in s["requests"])
    assert snapshots[-1]["num_preemptions"] > 0


def test_recorder_writes_one_frame_per_step_then_stops_watching(make_tiny_engine, tmp_path):
    engine = make_tiny_engine()
    assert engine.step_observers == []  # nobody watches: the engine does no snapshot work
    path = tmp_path / "trace.jsonl"
    seen: list[dict] = []
    with Recorder(engine, str(path)) as rec:
        engine.step_observers.append(lambda outputs: seen.append(engine.snapshot(detail=True)))
        for i in range(3):
            engine.add_request(f"r{i}", PREFIX + [700 + i], SamplingParams(max_tokens=5, ignore_eos=True))
        run(engine)
    engine.step_observers.pop()
    assert engine.step_observers == []
    head, lines = read_trace(str(path))
    frames = [json.loads(line) for line in lines]
    assert head["num_blocks"] == 64 and head["block_size"] == 4 and head["config"]["scheduling_policy"] == "fcfs"
    assert len(frames) == len(seen) == rec.frames > 1
    for frame, snap in zip(frames, seen):
        assert {k: v for k, v in frame.items() if k not in ("type", "t", "steps", "latency")} == snap
        assert [s[0] for s in frame["steps"]] == [snap["step"]]  # each frame carries its own step
    assert [f["t"] for f in frames] == sorted(f["t"] for f in frames)
    assert sum(frames[-1]["latency"]["ttft"]) == 3  # every request's first token was timed
    assert sum(frames[-1]["latency"]["itl"]) == 3 * 4


class FullDisk:
    name = "trace.jsonl"

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_the_header_shows_scheduling_settings_never_a_connectors_password(make_tiny_engine):
    """/scope/info is open whatever --api-key says, and traces are shared: the header used to hold the
    whole config, a Redis KV pool's URL with its password included."""
    from inferlab.scope.frames import SHOWN_SETTINGS, encode, header
    engine = make_tiny_engine(num_kv_blocks=16, block_size=4)
    engine.config.kv_transfer_config = {"kv_connector": "RedisConnector",
                                        "kv_connector_extra_config": {"url": "redis://:s3cret@10.0.0.5:6379"}}
    engine.config.master_addr = "10.0.0.9"
    head = header(engine, "live")
    assert set(head["config"]) == set(SHOWN_SETTINGS) and head["config"]["max_num_seqs"] == engine.config.max_num_seqs
    assert "s3cret" not in encode(head) and "10.0.0" not in encode(head)
    engine.config.scheduling_policy = "/home/ana/work/mine.py:Mine"
    assert header(engine, "live")["config"]["scheduling_policy"] == "mine.py:Mine"


def test_a_recording_that_cannot_write_is_refused_or_stops_without_harming_the_engine(make_tiny_engine, caplog,
                                                                                       tmp_path):
    engine = make_tiny_engine()
    with pytest.raises(ValueError, match="cannot record to /dev/full: No space left on device"):
        Recorder(engine, "/dev/full")
    with pytest.raises(ValueError, match="cannot record to .*/missing/trace.jsonl: No such file or directory"):
        Recorder(engine, str(tmp_path / "missing" / "trace.jsonl"))
    assert engine.step_observers == []
    with Recorder(engine, str(tmp_path / "trace.jsonl")) as rec:
        rec.file = FullDisk()  # the disk fills up mid-run
        for i in range(4):
            engine.add_request(f"r{i}", PREFIX + [800 + i], SamplingParams(max_tokens=40, ignore_eos=True))
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
    assert rec.failed and len(outputs) == 4 and all(len(o.outputs[0].token_ids) == 40 for o in outputs)
    assert "recording to trace.jsonl stopped: [Errno 28]" in caplog.text and engine.step_observers == []


def frame(step: int) -> str:
    """A frame line with what the page reads of one (a recording's own hold much more)."""
    return json.dumps({"type": "frame", "t": 0.1 * step, "step": step, "num_running": 1, "num_waiting": 0,
                       "num_preemptions": 0, "num_generation_tokens": step, "kv": {"usage": 0.1}, "batch": {},
                       "requests": [], "steps": [], "latency": {}})


@pytest.mark.parametrize("content,message", [
    ("", "empty file"),
    ('{"a": 1}\n', "line 1 is not an inferlab trace header"),
    ('{"type": "header", "version": 99}\n', "trace version 99 is not supported"),
    ('{"type": "header", "version": 1}\nhello\n', "line 2 is not a frame"),
    ('{"type": "header", "version": "1"}\n', r"trace version '1' is not supported \(expected 1\)"),
    # a frame corrupted in the middle: the page would stop there
    ('{"type":"header","version":1}\n{"type":"frame", broken\n' + frame(2) + "\n", "line 2 is not a frame"),
    ('{"type":"header","version":1}\n' + frame(1) + '\n["frame"]\n', "line 3 is not a frame"),
    # the right type, not the shape: the page went blank on it
    ('{"type":"header","version":1}\n' + frame(1) + '\n{"type":"frame","t":"x"}\n',
     "line 3 is not a frame the dashboard can show: its 't' is 'x'"),
    ('{"type":"header","version":1}\n', "the recording holds no frames"),
    # NaN is Python's JSON, not the page's JSON.parse: its replay never started
    ('{"type":"header","version":1}\n' + frame(1).replace('"t": 0.1', '"t": NaN') + "\n" + frame(2) + "\n",
     "line 2 is not a frame"),
])
def test_read_trace_refuses_what_is_not_a_trace(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_trace(str(path))


def test_read_trace_names_a_file_it_cannot_read(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(128, 256)))
    for path, message in ((tmp_path, "Is a directory"), (tmp_path / "bin.jsonl", "'utf-8' codec can't decode")):
        with pytest.raises(ValueError, match=f"^{path}: cannot read an inferlab trace from it: .*{message}"):
            read_trace(str(path))


def test_a_recording_cut_mid_line_keeps_its_whole_frames(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"type":"header","version":1}\n' + frame(1) + '\n{"type":"frame","ste')
    head, frames = read_trace(str(path))
    assert frames == [frame(1)]


def test_replay_app_serves_the_page_and_the_trace(make_tiny_engine, tmp_path):
    engine = make_tiny_engine()
    path = tmp_path / "trace.jsonl"
    with Recorder(engine, str(path)):
        engine.add_request("r", PREFIX, SamplingParams(max_tokens=3, ignore_eos=True))
        run(engine)
    client = TestClient(build_replay_app(str(path)))
    info = client.get("/scope/info").json()
    assert info["mode"] == "replay" and info["frames"] == 3 and info["num_blocks"] == 64
    assert client.get("/scope/trace").text.splitlines() == path.read_text().splitlines()[1:]
    page = client.get("/scope")
    assert page.status_code == 200 and "scope.js" in page.text
    for url, status, detail in [("/scope/trace?trace=1", 404, "no trace 1: 1 loaded"),
                                ("/scope/info?trace=x", 400, "trace: Input should be a valid integer")]:
        answer = client.get(url)  # one line, in one shape (a bad number was FastAPI's 422 list)
        assert (answer.status_code, answer.json()["detail"][:len(detail)]) == (status, detail)
    # a trace recorded before headers held the scheduling settings alone: served without the rest
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    head["config"]["kv_transfer_config"] = {"kv_connector_extra_config": {"url": "redis://:s3cret@h"}}
    old = tmp_path / "old.jsonl"
    old.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    info = TestClient(build_replay_app(str(old))).get("/scope/info").json()
    assert "s3cret" not in json.dumps(info) and info["config"]["max_num_seqs"] == head["config"]["max_num_seqs"]
    for asset in ("scope.js", "scope.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        assert client.get(f"/scope/static/{asset}").status_code == 200, asset


def test_bench_and_generate_record(tmp_path, capsys):
    wl = tmp_path / "wl.json"
    wl.write_text(json.dumps({"requests": [{"prompt_token_ids": list(range(100, 120)), "max_tokens": 3}]}))
    trace = tmp_path / "bench.jsonl"
    assert main(["bench", "--workload", str(wl), "--no-progress", "--num-kv-blocks", "32", "--record", str(trace)]) == 0
    head, frames = read_trace(str(trace))
    assert head["num_blocks"] == 32 and len(frames) == 4 + 3  # the 4-token warm-up's steps, then the workload's
    trace = tmp_path / "gen.jsonl"
    assert main(["generate", "hi", "--max-tokens", "4", "--num-kv-blocks", "32", "--record", str(trace)]) == 0
    assert len(read_trace(str(trace))[1]) == 4
    assert json.loads(capsys.readouterr().out.splitlines()[0])["output_tokens"] == 3


def test_scope_refuses_a_file_that_is_no_trace_in_one_line(tmp_path):
    r = inferlab("scope", "--replay", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "No such file" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "wl.json").write_text("{}")
    assert main(["scope", "--replay", str(tmp_path / "wl.json")]) == 2
