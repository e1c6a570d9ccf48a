"""Each experiment script runs end to end in its --smoke form and writes its table and plot."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# the first three and the last have tests of their own below
SCRIPTS = ["kv_waste", "policies", "preemption", "prefix_cache", "chunked_prefill", "memory_pressure", "block_size",
           "fidelity", "moe_mla"]


def run_smoke(name: str, out: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--smoke", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (out / f"{name}.md").read_text()


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.parametrize("name", SCRIPTS[3:-1])
def test_experiment_smoke_run_writes_a_table_and_a_plot(name, tmp_path):
    md = run_smoke(name, tmp_path)
    assert md.startswith("# ") and "Smoke run" in md
    rows = table_rows(md)
    assert len(rows) >= 3 and all(len(r) == len(rows[0]) for r in rows)


def test_policy_experiment_compares_a_policy_of_ones_own_on_engine_and_simulator(tmp_path):
    spec = f"{EXPERIMENTS.parent / 'examples' / 'srpt.py'}:ShortestPredictedOutput"
    rows = table_rows(run_smoke("policies", tmp_path, "--policy", spec))
    mine = "srpt.py:ShortestPredictedOutput"  # file and class: a class named FCFS takes no built-in's row
    assert [r[0] for r in rows if r[1] == mine] == ["engine", "simulator"]
    assert {r[1] for r in rows} == {"FCFS", "SJF", "SJF+aging", "priority", mine}


def test_policy_experiment_checks_the_policy_before_it_replays_anything(tmp_path):
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "policies.py"), "--smoke", "--out", str(tmp_path),
                        "--policy", "nosuch"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: --policy: unknown scheduling_policy 'nosuch'; choose one of " \
        "['fcfs', 'priority', 'sjf'] or give module:Class or file.py:Class\n"
    assert not list(tmp_path.iterdir())


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    r = subprocess.run([sys.executable, str(EXPERIMENTS / "kv_waste.py"), "--smoke", "--out", str(tmp_path / "file")],
                       capture_output=True, text=True, timeout=120)  # a FileExistsError traceback before
    assert r.returncode == 2 and f"error: --out {tmp_path / 'file'}: cannot write there" in r.stderr, r.stderr


def test_paged_allocation_wastes_little_where_contiguous_wastes_most(tmp_path):
    # no model involved: the smoke run computes the same figures as the full one, on one workload
    rows = table_rows(run_smoke("kv_waste", tmp_path))
    waste = {r[1]: float(r[2].rstrip("%")) for r in rows}
    assert waste["paged, block 16"] < 4 < 60 < waste["contiguous, reserve 2048"]
    concurrent = {r[1]: int(r[3].replace(",", "")) for r in rows}
    assert concurrent["paged, block 16"] > concurrent["contiguous, exact final length (oracle)"]


def test_preemption_experiment_swap_brings_back_what_recompute_computes_again(tmp_path):
    rows = table_rows(run_smoke("preemption", tmp_path))
    engine = {(r[2], r[3]): r for r in rows if r[0] == "engine"}
    assert int(engine[("off", "recompute")][5]) > 0 and int(engine[("off", "swap")][7]) > 0
    computed = {mode: int(engine[("off", mode)][6].replace(",", "")) for mode in ("recompute", "swap")}
    assert computed["swap"] < computed["recompute"]  # without the prefix cache every preemption recomputes
    sim = {(r[2], r[3], float(r[4])): float(r[9].replace(",", "")) for r in rows if r[0] == "simulator"}
    assert sim[("off", "swap", 0.01)] < sim[("off", "recompute", 0.01)]  # nearly free swaps win
    assert sim[("off", "swap", 10.0)] > sim[("off", "recompute", 10.0)]  # swaps dearer than prefill lose


def test_mla_cache_is_the_latent_and_moe_counts_match_the_published_ones(tmp_path):
    # exact in the smoke run too: the KV figures and parameter counts need no trained weights
    md = run_smoke("moe_mla", tmp_path)
    rows = table_rows(md)
    kv = {r[0]: r for r in rows if r[1] in ("MHA", "GQA", "MLA")}
    assert all(r[2] == r[3] for r in kv.values())  # the engine's pool holds what the formula says
    assert kv["DeepSeek-V3"][1] == "MLA" and kv["DeepSeek-V3"][2] == "1152"  # (512 + 64) x 2 bytes
    assert kv["DeepSeek-V2-Lite"][5] == "7.1x" and kv["DeepSeek-V2"][5] == "56.9x"  # the claim's 7x and 57x
    assert int(kv["SmolLM2-135M"][2]) < int(kv["DeepSeek-V3"][2])
    moe = [r for r in rows if "/" in r[1] and r[2][0].isdigit()]  # the MoE table, header left out
    assert moe
    for r in moe:
        total, active = float(r[2]), float(r[3])
        published_total, published_active = (float(v) for v in r[4].split(", "))
        assert abs(total / published_total - 1) < 0.03 and abs(active / published_active - 1) < 0.1, r


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py")))
def test_every_benchmark_script_loads(script):
    """What a script runs before its main (its tables of kernels' names and codes) holds against the
    package as it is now: profile_step.py once failed at start on a constant that had moved."""
    import runpy
    runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / script), run_name="benchmark")
