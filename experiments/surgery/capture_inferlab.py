"""Run the surgery room's traces through InferLab and record its scheduler step by step, in the
same format as capture_vllm.py (see compare.py), so the two can be laid side by side.

    .venv/bin/python experiments/surgery/capture_inferlab.py --model benchmarks/.cache/smollm2-float32

For the token-for-token comparison InferLab loads the very folder vLLM loads: the embedded
GGUF dequantized to float32 by transformers (benchmarks/vllm_cpu.py builds it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_format import add_step  # noqa: E402
from scenarios import OOM, SCENARIOS, oom_prompt, requests  # noqa: E402

from inferlab.config import EngineConfig  # noqa: E402
from inferlab.engine import LLMEngine  # noqa: E402
from inferlab.request import block_runs  # noqa: E402
from inferlab.sampling_params import SamplingParams  # noqa: E402

HERE = Path(__file__).resolve().parent


def config(s: dict, **overrides) -> EngineConfig:
    """InferLab's knobs for a scenario; the long-prefill cap is off, as vLLM's default is."""
    budget = s.get("max_num_batched_tokens", 2048)
    return EngineConfig(dtype="float32", num_kv_blocks=s["num_blocks"], block_size=s["block_size"],
                        max_model_len=s["max_model_len"], max_num_batched_tokens=budget,
                        long_prefill_token_threshold=budget, max_num_seqs=s.get("max_num_seqs", 256), **overrides)


def record_steps(engine: LLMEngine, index: dict[str, int]) -> list[dict]:
    """Wrap the engine's scheduler: after each schedule(), before the model runs (where the vLLM
    hook records too), note the batch and the pool."""
    steps: list[dict] = []
    sched, bm, original = engine.scheduler, engine.block_manager, engine.scheduler.schedule

    def schedule():
        out = original()
        add_step(steps, {
            "t": round(engine.clock() - start, 4),
            "sched": [[index[r.request_id], n, r.num_computed_tokens] for r, n in out.scheduled],
            "preempted": sorted(index[r.request_id] for r in out.preempted), "free": bm.num_free_blocks,
            "cells": bm.grid()["cells"], "prefix": [bm.prefix_queries, bm.prefix_hits],
            "tables": sorted([index[r.request_id], block_runs(r.block_table)]
                             for r in sched.live_requests() if r.block_table)})
        return out

    start = engine.clock()
    sched.schedule = schedule
    return steps


def capture(name: str, model: str | None = None, loaded=None, **overrides) -> dict:
    """One scenario; `loaded` (model, tokenizer) instead of `model` runs it on a model already in
    memory (the tests use a tiny one: the schedule does not depend on the model)."""
    s, reqs = SCENARIOS[name], requests(name)
    engine = LLMEngine(config(s, model=model, **overrides), loaded=loaded)
    index = {f"r{i}": i for i in range(len(reqs))}
    steps = record_steps(engine, index)
    for i, r in enumerate(reqs):
        engine.add_request(f"r{i}", {"prompt_token_ids": r["prompt_token_ids"]},
                           SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True))
    outputs: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[index[out.request_id]] = out.outputs[0].token_ids
    del engine.scheduler.schedule  # the recording wrapper
    try:
        engine.add_request("too-long", {"prompt_token_ids": oom_prompt() * 3})
        too_long = None
    except ValueError as e:
        too_long = str(e)
    bm = engine.block_manager
    return {"engine": "inferlab", "scenario": name, "knobs": s, "num_blocks": s["num_blocks"],
            "block_size": s["block_size"], "outputs": [outputs[i] for i in range(len(reqs))],
            "prefix": {"queries": bm.prefix_queries, "hits": bm.prefix_hits},
            "preemptions": engine.scheduler.num_preemptions, "too_long_error": too_long, "steps": steps}


def capture_oom(model: str | None = None, loaded=None) -> dict:
    """vLLM refuses to start with this pool; InferLab starts, then refuses what cannot fit: paged,
    a prompt longer than the pool; reserving, a second request beside a context-long reservation."""
    errors = {}
    for allocation, prompts in (("paged", [oom_prompt()]), ("reserve", [oom_prompt()[:100], oom_prompt()[:20]])):
        engine = LLMEngine(config(OOM, model=model, kv_allocation=allocation), loaded=loaded)
        try:
            for i, ids in enumerate(prompts):
                engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(max_tokens=None))
        except ValueError as e:
            errors[allocation] = str(e)
    return {"engine": "inferlab", "scenario": "oom", "knobs": OOM, "startup_error": None,
            "paged_error": errors.get("paged"), "reserve_error": errors.get("reserve")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder (the embedded model dequantized to float32)")
    ap.add_argument("--out", default=str(HERE / "captures"))
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for name in [*SCENARIOS, "oom"]:
        cap = capture_oom(a.model) if name == "oom" else capture(name, a.model)
        path = Path(a.out, f"inferlab-{name}.json")
        path.write_text(json.dumps(cap, separators=(",", ":")) + "\n")
        print(f"wrote {path} ({path.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
