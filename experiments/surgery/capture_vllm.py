"""Run the surgery room's traces through real vLLM (its CPU backend) and record what its scheduler
did, step by step. Runs in vLLM's own environment (`make surgery` creates it):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 taskset -c 1 \\
        .venv-vllm/bin/python experiments/surgery/capture_vllm.py --model benchmarks/.cache/smollm2-float32

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so wrapping
`vllm.v1.core.sched.scheduler.Scheduler.schedule` sees every step's SchedulerOutput and the
scheduler's own state: tokens per request, preemptions, the block pool, the block tables.
Prefix-cache lookups are counted by wrapping `KVCacheManager.record_prefix_cache_stats`.
Writes one JSON capture per scenario (format: compare.py) and the OOM messages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_format import add_step, runs  # noqa: E402
from scenarios import OOM, SCENARIOS, oom_prompt, requests  # noqa: E402

HERE = Path(__file__).resolve().parent


class Recorder:
    """Wraps the scheduler of the in-process engine core; one record per schedule() call."""

    def __init__(self, reqs: list[dict]) -> None:
        self.index = {tuple(r["prompt_token_ids"]): i for i, r in enumerate(reqs)}
        self.steps: list[dict] = []
        self.prefix = {"queries": 0, "hits": 0, "preempted_queries": 0, "preempted_hits": 0}
        self.start = time.monotonic()
        self.hooked = None

    def hook(self, sched) -> None:
        """Count prefix-cache lookups as vLLM's own stats do (they are off in the offline LLM)."""
        if self.hooked is sched:
            return
        self.hooked = sched
        kvm, record = sched.kv_cache_manager, sched.kv_cache_manager.record_prefix_cache_stats

        def counted(request, num_hits: int) -> None:
            if kvm.prefix_cache_lookup_enabled(request):
                pre = "preempted_" if request.num_preemptions > 0 else ""
                self.prefix[pre + "queries"] += request.num_tokens
                self.prefix[pre + "hits"] += num_hits
            record(request, num_hits)
        kvm.record_prefix_cache_stats = counted

    def record(self, sched, out) -> None:
        idx = {rid: self.index.get(tuple(r.prompt_token_ids)) for rid, r in sched.requests.items()}
        # num_computed_tokens has already been advanced by this step's tokens (_update_after_schedule)
        sched_list = [[idx[rid], n, sched.requests[rid].num_computed_tokens - n]
                      for rid, n in out.num_scheduled_tokens.items() if idx.get(rid) is not None]
        pool = sched.kv_cache_manager.block_pool
        # vLLM's block 0 is its null block, never handed out: left out, ids shifted down by one
        states = [b.ref_cnt or (-1 if b.block_hash is not None else 0) for b in pool.blocks[1:]]
        tables = []
        for rid, r in sched.requests.items():
            blocks = [b - 1 for b in sched.kv_cache_manager.get_block_ids(rid)[0]]
            if idx.get(rid) is not None and not r.is_finished() and blocks:
                tables.append([idx[rid], runs(blocks)])
        add_step(self.steps, {
            "t": round(time.monotonic() - self.start, 4), "sched": sched_list,
            "preempted": sorted(idx[r] for r in (out.preempted_req_ids or ()) if idx.get(r) is not None),
            "free": pool.get_num_free_blocks(), "cells": runs(states, consecutive=False), "tables": sorted(tables),
            "prefix": [self.prefix["queries"] + self.prefix["preempted_queries"],
                       self.prefix["hits"] + self.prefix["preempted_hits"]]})


RECORDER: Recorder | None = None


def install_hook() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    original = Scheduler.schedule

    def schedule(self, *args, **kwargs):
        if RECORDER is not None:
            RECORDER.hook(self)
        out = original(self, *args, **kwargs)
        if RECORDER is not None:
            RECORDER.record(self, out)
        return out
    Scheduler.schedule = schedule


def engine(model: str, num_blocks: int, block_size: int, max_model_len: int, **knobs):
    from vllm import LLM
    # gpu_memory_utilization is the share of host memory vLLM's CPU backend claims (default 0.92)
    return LLM(model=model, dtype="float32", seed=0, enforce_eager=True, enable_prefix_caching=True,
               gpu_memory_utilization=0.25,
               block_size=block_size, num_gpu_blocks_override=num_blocks + 1, max_model_len=max_model_len,
               **knobs)


def capture(model: str, name: str, version: str) -> dict:
    global RECORDER
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    s, reqs = SCENARIOS[name], requests(name)
    llm = engine(model, s["num_blocks"], s["block_size"], s["max_model_len"],
                 max_num_batched_tokens=s["max_num_batched_tokens"], max_num_seqs=s["max_num_seqs"])
    RECORDER = Recorder(reqs)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs],
                        [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs],
                        use_tqdm=False)
    rec, RECORDER = RECORDER, None
    long_error = None
    try:  # a prompt past max_model_len, to see the refusal
        llm.generate([TokensPrompt(prompt_token_ids=oom_prompt() * 3)], SamplingParams(max_tokens=1), use_tqdm=False)
    except Exception as e:  # noqa: BLE001 - whatever vLLM raises is what we came to see
        long_error = f"{type(e).__name__}: {e}"
    del llm
    return {"engine": f"vllm {version}", "scenario": name, "knobs": s, "num_blocks": s["num_blocks"],
            "block_size": s["block_size"], "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "prefix": rec.prefix, "preemptions": sum(len(st["preempted"]) for st in rec.steps),
            "too_long_error": long_error, "steps": rec.steps}


def capture_oom(model: str, version: str) -> dict:
    try:
        engine(model, OOM["num_blocks"], OOM["block_size"], OOM["max_model_len"])
        error = None
    except Exception as e:  # noqa: BLE001 - vLLM checks at start that one max_model_len request fits the pool
        error = f"{type(e).__name__}: {e}"
    return {"engine": f"vllm {version}", "scenario": "oom", "knobs": OOM, "startup_error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF folder (the embedded model dequantized to float32)")
    ap.add_argument("--out", default=str(HERE / "captures"))
    ap.add_argument("--scenario", action="append", choices=[*SCENARIOS, "oom"], default=None)
    a = ap.parse_args()
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        sys.exit("set VLLM_ENABLE_V1_MULTIPROCESSING=0: the scheduler is hooked in this process")
    import vllm
    install_hook()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for name in a.scenario or [*SCENARIOS, "oom"]:
        cap = capture_oom(a.model, vllm.__version__) if name == "oom" else capture(a.model, name, vllm.__version__)
        path = Path(a.out, f"vllm-{name}.json")
        path.write_text(json.dumps(cap, separators=(",", ":")) + "\n")
        print(f"wrote {path} ({path.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
