"""The simulator runs the engine's own scheduler on a virtual clock; calibrate fits its cost model."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from inferlab.config import EngineConfig
from inferlab.sim.calibrate import calibrate
from inferlab.sim.cost_model import DEFAULT, CostModel, StepFeatures
from inferlab.sim.simulator import load_trace, make_trace, simulate


def test_fit_recovers_a_known_cost_model():
    truth = CostModel(0.02, 1e-3, 2e-3, 1e-5)
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        f = StepFeatures(rng.randint(0, 512), rng.randint(0, 64), rng.randint(0, 20000))
        samples.append((f, truth.step_time(f) * rng.uniform(0.97, 1.03)))
    fit = CostModel.fit(samples)
    for name in ("base", "per_prefill_token", "per_decode_seq", "per_context_token"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.15), name


def test_fit_never_goes_negative():
    samples = [(StepFeatures(p, 0, 0), 0.05 - 1e-5 * p) for p in range(0, 400, 20)]  # time falling with work
    fit = CostModel.fit(samples)
    assert min(vars(fit).values()) >= 0


def config(policy: str = "fcfs", **kw) -> EngineConfig:
    return EngineConfig(block_size=16, scheduling_policy=policy, max_num_seqs=32, max_num_batched_tokens=512, **kw)


def test_every_request_completes_with_its_tokens():
    trace = make_trace(300, 20.0, (16, 300), (4, 64), seed=1)
    result = simulate(config(), 512, trace, DEFAULT)
    assert result["completed"] == 300 and result["rejected"] == 0
    assert result["output_tok_s"] * result["makespan_s"] == pytest.approx(sum(t.output_len for t in trace), rel=1e-3)
    assert result["ttft_s_p50"] <= result["ttft_s_p90"] <= result["ttft_s_p99"]
    assert simulate(config(), 512, trace, DEFAULT) == result  # deterministic


def test_small_pool_preempts_and_still_finishes():
    trace = make_trace(100, float("inf"), (100, 200), (100, 200), seed=2)
    result = simulate(config(), 64, trace, DEFAULT)
    assert result["completed"] == 100 and result["preemptions"] > 0 and result["peak_kv_usage"] > 0.9


def test_sjf_cuts_median_wait_versus_fcfs():
    trace = make_trace(400, 8.0, (16, 64), (4, 300), seed=3)
    fcfs = simulate(config("fcfs"), 2048, trace, DEFAULT)
    sjf = simulate(config("sjf"), 2048, trace, DEFAULT)
    assert sjf["queue_s_p50"] < fcfs["queue_s_p50"]


def test_shared_prefix_is_served_from_the_cache():
    trace = make_trace(200, float("inf"), (300, 300), (8, 8), seed=4, shared_prefix=(2, 256))
    cached = simulate(config(), 2048, trace, DEFAULT)
    uncached = simulate(config(enable_prefix_caching=False), 2048, trace, DEFAULT)
    assert cached["makespan_s"] < 0.6 * uncached["makespan_s"]


def test_trace_file_round_trip(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival": 0.5, "prompt_len": 20, "output_len": 3, "priority": 1}\n'
                    '{"arrival": 0.1, "prompt_len": 10, "output_len": 2}\n')
    trace = load_trace(str(path))
    assert [t.arrival for t in trace] == [0.1, 0.5] and trace[1].priority == 1
    assert simulate(config(), 64, trace, DEFAULT)["completed"] == 2
    path.write_text('{"arrival": 0.5}\n')
    with pytest.raises(ValueError, match="cannot read trace"):
        load_trace(str(path))


def test_calibrate_fits_timed_steps_of_a_real_engine(make_tiny_engine):
    model, steps = calibrate(make_tiny_engine(num_kv_blocks=256, block_size=16), scale=0.25)
    assert steps > 20 and min(vars(model).values()) >= 0 and model.step_time(StepFeatures(64, 8, 2000)) > 0


def test_simulate_command_prints_json_last():
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "simulate", "--num-requests", "50", "--rate", "inf",
                        "--policy", "sjf", "--num-kv-blocks", "256"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["completed"] == 50 and result["policy"] == "sjf"
