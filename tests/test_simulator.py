"""The simulator runs the engine's own scheduler on a virtual clock; calibrate fits its cost model."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from inferlab import SamplingParams
from inferlab.cli import main
from inferlab.config import EngineConfig
from inferlab.policy import RequestQueue, make_queue
from inferlab.sim.calibrate import calibrate
from inferlab.sim.cost_model import DEFAULT, CostModel, StepFeatures
from inferlab.sim.simulator import TraceRequest, load_trace, make_trace, run, simulate, summarize


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


def test_median_error_says_how_well_a_model_explains_the_steps():
    truth = CostModel(0.02, 1e-3, 2e-3, 1e-5)
    samples = [(StepFeatures(p, d, 100 * p), truth.step_time(StepFeatures(p, d, 100 * p)))
               for p in range(0, 400, 40) for d in range(0, 32, 8)]
    assert truth.median_error(samples) == pytest.approx(0, abs=1e-12)
    noisy = [(f, t * (2.0 if i % 2 else 0.5)) for i, (f, t) in enumerate(samples)]  # a busy machine
    assert CostModel.fit(noisy).median_error(noisy) > 0.25  # past calibrate's warning


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
    assert result["queue_s_p99"] <= result["longest_wait_s"]  # rounded alike (0.3332 against 0.333 before)


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
    assert [t.arrival for t in trace] == [0.0, pytest.approx(0.4)] and trace[1].priority == 1  # from the first
    assert simulate(config(), 64, trace, DEFAULT)["completed"] == 2
    path.write_text('{"arrival": 1764950400.25, "prompt_len": 10, "output_len": 2}\n')  # wall-clock times
    late = simulate(config(), 64, load_trace(str(path)), DEFAULT)
    path.write_text('{"arrival": 0, "prompt_len": 10, "output_len": 2}\n')
    assert late == simulate(config(), 64, load_trace(str(path)), DEFAULT) and late["output_tok_s"] > 1
    path.write_text('{"arrival": 0.5}\n')
    with pytest.raises(ValueError, match="cannot read trace"):
        load_trace(str(path))
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no requests"):  # it ran, reporting nothing at all
        load_trace(str(path))
    path.write_text('{"type": "header", "version": 1}\n')
    with pytest.raises(ValueError, match="is a dashboard recording .*inferlab scope --replay"):
        load_trace(str(path))


@pytest.mark.parametrize("line, message", [
    ('{"arrival": 0, "prompt_len": "x", "output_len": 5}', "prompt_len must be an integer, got 'x'"),
    ('{"arrival": 0, "prompt_len": 10.7, "output_len": 5}', "prompt_len must be an integer, got 10.7"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": true}', "output_len must be an integer"),
    ('{"arrival": "nan", "prompt_len": 10, "output_len": 5}', "arrival must be a number of seconds >= 0"),
    ('{"arrival": NaN, "prompt_len": 10, "output_len": 5}', "arrival must be a number of seconds >= 0"),
    ('{"arrival": -5, "prompt_len": 10, "output_len": 5}', "arrival must be a number of seconds >= 0"),
    ('{"arrival": 1' + "0" * 400 + ', "prompt_len": 10, "output_len": 5}',  # (an OverflowError traceback)
     "arrival must be a number of seconds >= 0"),
    ('{"arrival": 0, "prompt_len": 0, "output_len": 5}', "prompt_len and output_len must be at least 1"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 0}', "prompt_len and output_len must be at least 1"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 5, "prefix_id": 1, "prefix_len": 20}',
     r"prefix_len must be between 0 and prompt_len \(10\)"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 5, "priority": "high"}', "priority must be an integer"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 5, "prefix_id": -2, "prefix_len": 4}',
     "prefix_id must be an integer >= 0 or null, got -2"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 5, "max_tokens": 0}', "max_tokens must be an integer >= 1"),
    ('[0, 10, 5]', "expected a JSON object, got list"),
    ('{"arrival": 0, "prompt_len": 10}', r"missing output_len \(a request has arrival, prompt_len, output_len"),
    ('{"arrival": 0, "prompt_len": 10, "output_len": 5, "prio": 1}', "unknown field prio"),
])
def test_a_trace_line_that_is_no_request_is_refused_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival": 0, "prompt_len": 10, "output_len": 5}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"cannot read trace {re.escape(str(path))}: line 3: {message}"):
        load_trace(str(path))


def test_a_binary_trace_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "trace.bin"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match=f"cannot read trace {re.escape(str(path))}: 'utf-8' codec"):
        load_trace(str(path))


def test_a_generated_shared_prefix_longer_than_the_prompt_is_the_whole_prompt():
    trace = make_trace(20, 5.0, (8, 16), (1, 4), shared_prefix=(2, 12))
    assert all(t.prefix_len == min(12, t.prompt_len) for t in trace) and min(t.prompt_len for t in trace) < 12


def test_calibrate_fits_timed_steps_of_a_real_engine(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=256, block_size=16)
    swapped: list[bool] = []  # calibration watches through the runner's hook, never by replacing execute
    engine.step_observers.append(lambda outputs: swapped.append("execute" in vars(engine.runner)))
    model, steps, error = calibrate(engine, scale=0.25)
    assert steps > 20 and min(vars(model).values()) >= 0 and model.step_time(StepFeatures(64, 8, 2000)) > 0
    assert 0 <= error < float("inf")
    assert swapped and not any(swapped) and engine.runner.on_execute is None


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_calibrate_refuses_a_scale_that_is_not_positive(tmp_path, capsys, scale):
    out = tmp_path / "cm.json"
    assert main(["calibrate", "--scale", scale, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --scale must be a positive number, got {float(scale)}\n"
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ({"base": "x", "per_prefill_token": 0, "per_decode_seq": 0, "per_context_token": 0},
     "{path}: cost model base must be a number >= 0, got 'x'"),  # a TypeError traceback mid-run before
    ({"base": -1, "per_prefill_token": 0, "per_decode_seq": 0, "per_context_token": 0},
     "{path}: cost model base must be a number >= 0, got -1"),  # a negative makespan, exit 0, before
    ({"base": 1.0}, "cost model {path}: expected an object with base, per_prefill_token, per_decode_seq, "
                    "per_context_token \\(and optionally per_swap_byte, kv_bytes_per_token\\)"),
    ([1], "cost model {path}: expected an object with"),
    ({"base": 10**400, "per_prefill_token": 0, "per_decode_seq": 0, "per_context_token": 0},
     "{path}: cost model base must be a number >= 0, got 1000"),  # an OverflowError mid-run before
    ({"base": 0, "per_prefill_token": 0, "per_decode_seq": 0, "per_context_token": 0, "kv_bytes_per_token": 0},
     "{path}: cost model kv_bytes_per_token must be a whole number of bytes >= 1, got 0"),  # ZeroDivisionError
    ({"base": 0, "per_prefill_token": 0, "per_decode_seq": 0, "per_context_token": 0, "kv_bytes_per_token": 1.5},
     "{path}: cost model kv_bytes_per_token must be a whole number of bytes >= 1, got 1.5"),
    ("{", "cannot read cost model {path}: Expecting"),
])
def test_a_bad_cost_model_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "cm.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["simulate", "--num-requests", "5", "--cost-model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match("error: " + message.format(path=re.escape(str(path))), err), err


def test_a_policy_whose_key_fails_on_a_running_request_is_one_line(tmp_path, capsys):
    """key() also orders the running batch each step and requeues the preempted: its failure there is
    named, as victim()'s is, not a traceback."""
    path = tmp_path / "mine.py"
    path.write_text("from inferlab.policy import RequestQueue\nclass P(RequestQueue):\n"
                    "    def key(self, req):\n        return (1 / (1 - min(1, req.num_output_tokens)),)\n")
    assert main(["simulate", "--policy", f"{path}:P", "--num-kv-blocks", "64", "--num-requests", "20",
                 "--rate", "inf"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the scheduling policy's key() failed: ZeroDivisionError: division by zero\n"


def test_a_policy_file_is_read_again_once_edited_and_may_hold_dataclasses(tmp_path):
    """A file's classes were cached by the policy's name, so an edit did nothing in a notebook; and
    a @dataclass in a file (under `from __future__ import annotations`) could not be loaded."""
    from inferlab.policy import make_queue
    from inferlab.request import Request
    from inferlab.sampling_params import SamplingParams
    path = tmp_path / "mine.py"
    req = Request("r", [1, 2, 3], SamplingParams(), 0.0)
    for i, weight in enumerate((1, 2)):
        path.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n"
                        "from inferlab.policy import RequestQueue\n@dataclass\nclass Weights:\n"
                        f"    w: int = {weight}\nclass P(RequestQueue):\n"
                        "    def key(self, req):\n        return (Weights().w,)\n")
        os.utime(path, ns=(i * 10**9, i * 10**9))  # two edits within one clock tick still differ
        assert make_queue(f"{path}:P").key(req) == (weight,)


def test_a_policy_taking_aging_rate_gets_the_engines_and_others_are_built_bare():
    """sjf's subclasses were built with the rate as a positional argument, so one whose __init__
    takes none could not be built."""
    from inferlab.policy import SJFQueue, _build

    class Fixed(SJFQueue):
        def __init__(self):
            super().__init__(aging_rate=50.0)

    class Rated(SJFQueue):
        pass

    assert _build(Fixed, 7.0).aging_rate == 50.0 and _build(Rated, 7.0).aging_rate == 7.0


def test_a_policy_whose_victim_rule_fails_is_one_line(tmp_path, capsys):
    """victim() is a policy's as key() is: its failure is named, not a traceback out of the step loop."""
    path = tmp_path / "mine.py"
    path.write_text("from inferlab.policy import RequestQueue\nclass P(RequestQueue):\n"
                    "    def key(self, req):\n        return (req.arrival_time,)\n"
                    "    def victim(self, running):\n        return self.pick(running)\n")
    assert main(["simulate", "--policy", f"{path}:P", "--num-kv-blocks", "40", "--num-requests", "50",
                 "--rate", "inf"]) == 2
    assert capsys.readouterr().err == ("error: the scheduling policy's victim() failed: AttributeError: 'P' object "
                                       "has no attribute 'pick'\n")


def test_a_cap_hides_the_answers_length_from_sjf_and_the_answer_still_ends_at_its_length():
    """By default a trace's output_len is its max_tokens: sjf knows each answer's length. With a cap,
    as clients send, it sees only the cap; the answer still ends after output_len tokens (its EOS)."""
    long, short = TraceRequest(0.0, 32, 100), TraceRequest(0.0, 32, 10)
    order = {}
    for cap in (None, 200):
        trace = [replace(long, max_tokens=cap), replace(short, max_tokens=cap)]
        fleet = run(EngineConfig(block_size=16, scheduling_policy="sjf", max_num_seqs=1), 64, trace, DEFAULT)
        order[cap] = [r[0] for r in fleet.records]  # by finish time
        assert sorted(r[5] for r in fleet.records) == [10, 100]  # tokens each answer had
    assert order == {None: [1, 0], 200: [0, 1]}  # the short one first only when its length is known


@pytest.mark.parametrize("body, message", [
    ("    def peek(self):\n        return None if len(self) > 3 else super().peek()\n",
     "the scheduling policy's peek() returned None, not a waiting request"),
    ("    def pop(self):\n        if len(self) > 3:\n            raise RuntimeError('boom')\n"
     "        return super().pop()\n", "the scheduling policy's pop() failed: RuntimeError: boom"),
    ("    def pop(self):\n        return super().pop() if len(self) < 4 else self.waiting_other()\n"
     "    def waiting_other(self):\n        super().pop()\n        return super().pop()\n",
     "the scheduling policy's pop() returned request '1', not '0', which its peek() gave"),
])
def test_a_policy_whose_peek_or_pop_fails_midrun_is_one_line(tmp_path, capsys, body, message):
    """peek() and pop() are a policy's to override too (a traceback, or a request lost, before)."""
    path = tmp_path / "mine.py"
    path.write_text("from inferlab.policy import FCFSQueue\nclass P(FCFSQueue):\n" + body)
    assert main(["simulate", "--policy", f"{path}:P", "--num-kv-blocks", "64", "--num-requests", "30",
                 "--rate", "inf", "--max-num-seqs", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_policy_file_that_exits_at_import_is_one_line(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("import sys\nsys.exit(3)\n")  # it ended the command with status 3 and no word
    assert main(["simulate", "--policy", f"{path}:P", "--num-requests", "5"]) == 2
    assert "cannot load scheduling policy" in capsys.readouterr().err


def test_calibrating_on_steps_too_alike_is_refused(make_tiny_engine):
    """(calibrate --scale 1e-9 timed only one-token prefills, and saved a model that predicted 33 s a token.)"""
    with pytest.raises(ValueError, match="at scale 1e-09 are too alike to fit a cost model"):
        calibrate(make_tiny_engine(), scale=1e-9)


def test_a_policy_whose_should_preempt_fails_is_one_line(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("from inferlab.policy import FCFSQueue\nclass P(FCFSQueue):\n"
                    "    def should_preempt(self, waiting, running):\n        raise RuntimeError('boom')\n")
    assert main(["simulate", "--policy", f"{path}:P", "--num-kv-blocks", "64", "--num-requests", "60",
                 "--rate", "inf", "--max-num-seqs", "8"]) == 2
    assert capsys.readouterr().err == "error: the scheduling policy's should_preempt() failed: RuntimeError: boom\n"


def test_simulate_command_prints_json_last():
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "simulate", "--num-requests", "50", "--rate", "inf",
                        "--policy", "sjf", "--num-kv-blocks", "256"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["completed"] == 50 and result["policy"] == "sjf"


def test_latencies_no_request_measured_are_null_not_zero():
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "simulate", "--num-requests", "5", "--rate", "inf",
                        "--num-kv-blocks", "4", "--prompt-len", "100:200"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["completed"] == 0 and result["rejected"] == 5  # 4 blocks hold no prompt
    assert result["ttft_s_p50"] is None and result["e2e_s_p99"] is None and result["longest_wait_s"] is None
    assert "      ttft_s_p50  -\n" in r.stdout
    one_token = simulate(config(), 512, make_trace(3, float("inf"), (16, 32), (1, 1), seed=0), DEFAULT)
    assert one_token["completed"] == 3 and one_token["tpot_s_p50"] is None  # no second token to time
    assert one_token["ttft_s_p50"] > 0


@pytest.mark.parametrize("option, message", [
    (["--rate", "0"], "--rate must be positive (inf: all at once), got 0.0"),
    (["--rate", "-1"], "--rate must be positive (inf: all at once), got -1.0"),
    (["--rate", "nan"], "--rate must be positive (inf: all at once), got nan"),
    (["--rate", "1e-300"], "--rate 1e-300 spreads 20 requests over ~2e+301 s, past the 1e+09 s within which the "
                           "simulator's clock resolves a millisecond"),
    (["--burst", "0"], "--burst must be at least 1, got 0"),
    (["--priorities", "0"], "--priorities must be at least 1, got 0"),
    (["--prompt-len", "0"], "--prompt-len must be N or LO:HI with 1 <= LO <= HI, got 0:0"),
    (["--prompt-len", "10:5"], "--prompt-len must be N or LO:HI with 1 <= LO <= HI, got 10:5"),
    (["--output-len", "0:4"], "--output-len must be N or LO:HI with 1 <= LO <= HI, got 0:4"),
    (["--shared-prefix", "0:10"], "--shared-prefix must be COUNT:LEN, both at least 1, got 0:10"),
    (["--num-requests", "-5"], "--num-requests must be at least 1, got -5"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),  # an empty run, exit 0, before
    (["--num-kv-blocks", "0"], "--num-kv-blocks must be >= 1, got 0"),  # every request "rejected", exit 0
    (["--num-kv-blocks", "1000000000"], "--num-kv-blocks 1000000000 x --replicas 1 is more than the 16,777,216 KV "
                                        "blocks the simulator holds in memory"),  # a MemoryError, or the machine's
])
def test_a_bad_trace_option_is_one_line_naming_it(capsys, option, message):
    assert main(["simulate", "--num-requests", "20", *option]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("value", ["4", "4:x"])
def test_shared_prefix_takes_a_count_and_a_length(capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--shared-prefix", value])
    assert e.value.code == 2 and f"expected COUNT:LEN, got '{value}'" in capsys.readouterr().err


def test_prefix_aware_router_keeps_each_prefix_on_one_replica():
    # 16 shared prompts (a 512-token prefix cut to each prompt's 64-128 tokens, 4-8 blocks), 100 requests a replica
    trace = make_trace(400, 6.0, (64, 128), (8, 32), seed=5, shared_prefix=(16, 512))
    rr = simulate(config(), 256, trace, DEFAULT, replicas=4, router="round_robin")
    aware = simulate(config(), 256, trace, DEFAULT, replicas=4, router="prefix_aware")
    assert rr["completed"] == aware["completed"] == 400
    assert aware["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.05
    assert aware["prefill_tokens"] < 0.7 * rr["prefill_tokens"]


def test_least_loaded_router_avoids_piling_long_jobs_on_one_replica():
    # every 4th request is long: round robin sends all of them to the same one of 4 replicas
    trace = [TraceRequest(i * 0.25, 64, 800 if i % 4 == 0 else 16) for i in range(400)]
    rr = simulate(config(), 1024, trace, DEFAULT, replicas=4, router="round_robin")
    least = simulate(config(), 1024, trace, DEFAULT, replicas=4, router="least_loaded")
    assert least["queue_s_p99"] < 0.1 * rr["queue_s_p99"] and least["makespan_s"] < rr["makespan_s"]


def test_replicas_share_the_load_and_every_request_runs_once():
    trace = make_trace(300, float("inf"), (16, 200), (4, 64), seed=8)
    one = run(config(), 512, trace, DEFAULT)
    two = run(config(), 512, trace, DEFAULT, replicas=2, router="round_robin")
    assert sorted(r[0] for r in two.records) == list(range(300))
    assert [len(r.done) for r in two.replicas] == [150, 150]
    assert summarize(two)["makespan_s"] < 0.7 * summarize(one)["makespan_s"]
    with pytest.raises(ValueError, match="router"):
        run(config(), 512, trace, DEFAULT, replicas=2, router="random")


USER_POLICY = f"{Path(__file__).parent.parent / 'examples' / 'srpt.py'}:ShortestPredictedOutput"


def test_a_user_policy_from_a_file_runs_in_the_simulator_and_the_engine(make_tiny_engine):
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "simulate", "--num-requests", "60", "--rate", "inf",
                        "--policy", USER_POLICY, "--num-kv-blocks", "128"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["completed"] == 60
    engine = make_tiny_engine(max_num_seqs=1, scheduling_policy=USER_POLICY)
    # predicted outputs: 32 + prompt/2 capped by max_tokens -> the short-prompt request first
    for rid, n in (("long", 40), ("short", 8)):
        engine.add_request(rid, {"prompt_token_ids": list(range(300, 300 + n))},
                           SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["short", "long"]


class _LastInFirstOut(RequestQueue):  # a class defined where the engine is made, as in a notebook
    def key(self, req):
        return (-req.arrival_time, -req.seq)


def test_a_policy_class_itself_is_taken_by_its_name():
    config = EngineConfig(scheduling_policy=_LastInFirstOut)
    assert config.scheduling_policy == f"{__name__}:_LastInFirstOut"
    assert isinstance(make_queue(config.scheduling_policy), _LastInFirstOut)


@pytest.mark.parametrize("policy, message", [("lifo", "unknown --policy 'lifo'"),
                                              ("nowhere.py:Q", "cannot load"),
                                              ("inferlab.request:Request", "not a subclass")])
def test_a_bad_policy_is_one_line_and_exit_2(policy, message):
    r = subprocess.run([sys.executable, "-m", "inferlab.cli", "simulate", "--policy", policy],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("body, message", [
    ("undefined_name\n", "cannot load scheduling policy .*NameError"),
    ("class P(RequestQueue):\n    pass\n", "defines no key"),
    ("class P(RequestQueue):\n    def __init__(self, weight):\n        super().__init__()\n"
     "    def key(self, req):\n        return (0,)\n", "cannot be built: TypeError"),
    ("class P(RequestQueue):\n    def key(self, req):\n        return (req.expected_len,)\n",
     "fails on a new request: AttributeError"),
    ("class P(RequestQueue):\n    def __init__(self, weight=2):\n        self.weight = weight\n"
     "    def key(self, req):\n        return (0,)\n", "cannot queue a request: AttributeError: .*_heap"),
])
def test_a_policy_that_cannot_work_is_refused_at_start(tmp_path, body, message):
    """Not mid-run: a policy that failed in the step loop took a served request down with it."""
    from inferlab.config import EngineConfig
    path = tmp_path / "mine.py"
    path.write_text("from inferlab.policy import RequestQueue\n" + body)
    with pytest.raises(ValueError, match=message):
        EngineConfig(scheduling_policy=f"{path}:P")


def test_a_trace_refuses_the_options_of_a_generated_one(tmp_path, capsys):
    """(simulate --trace t.jsonl --rate -1 --num-requests 0 ran the trace, the options ignored without a word.)"""
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival": 0, "prompt_len": 10, "output_len": 5}\n')
    assert main(["simulate", "--trace", str(path), "--rate", "-1"]) == 2
    assert capsys.readouterr().err == "error: --rate is for a generated trace: --trace gives each request\n"
    assert main(["simulate", "--trace", str(path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["requests"] == 1
