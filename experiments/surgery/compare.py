"""The surgery room's comparison: vLLM's and InferLab's captures of the same scenario side by side —
greedy outputs token for token, prefix-cache lookups and hits, preemptions, each step's batch —
written to results.md; and both timelines as dashboard traces (`--scope DIR`), to replay together:

    .venv/bin/python experiments/surgery/compare.py --scope /tmp/surgery
    inferlab scope --replay /tmp/surgery/vllm-cache.jsonl --replay /tmp/surgery/inferlab-cache.jsonl

Captures are read from experiments/surgery/captures/ (the format: capture_format.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_format import expand  # noqa: E402
from scenarios import SCENARIOS  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = ("vllm", "inferlab")


def load(folder: Path, engine: str, scenario: str) -> dict:
    return json.loads(Path(folder, f"{engine}-{scenario}.json").read_text())


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (the shorter length if one is a prefix)."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def split(cap: dict, step: dict) -> tuple[int, int]:
    """(prefill, decode) tokens of a step. A decode is one token past the prompt."""
    prompts = cap["knobs"]["prompt_lens"]
    decode = sum(1 for i, n, before in step["sched"] if n == 1 and before >= prompts[i])
    return sum(n for _, n, _ in step["sched"]) - decode, decode


def batches(cap: dict) -> list[list[tuple[int, int]]]:
    """Each step's batch as sorted (request, tokens) pairs: what the two schedulers are compared on."""
    return [sorted((i, n) for i, n, _ in s["sched"]) for s in cap["steps"]]


def summary(cap: dict) -> dict:
    steps = cap["steps"]
    splits = [split(cap, s) for s in steps]
    p = cap["prefix"]
    return {"steps": len(steps), "prefill tokens": sum(s[0] for s in splits),
            "decode tokens": sum(s[1] for s in splits), "mixed steps": sum(1 for a, b in splits if a and b),
            "largest batch": max(sum(s) for s in splits), "preemptions": cap["preemptions"],
            "prefix queries": p["queries"] + p.get("preempted_queries", 0),
            "prefix hits": p["hits"] + p.get("preempted_hits", 0)}


def compare(vllm: dict, mine: dict) -> dict:
    """What differs between two captures of one scenario, as data (the tests read it)."""
    outs = [first_difference(a, b) for a, b in zip(vllm["outputs"], mine["outputs"], strict=True)]
    a, b = batches(vllm), batches(mine)
    same = [x == y for x, y in zip(a, b)]
    return {"outputs_identical": all(d is None for d in outs), "first_token_difference": outs,
            "summary": {"vllm": summary(vllm), "inferlab": summary(mine)},
            "identical_steps": sum(same), "steps": (len(a), len(b)),
            "first_step_difference": next((k for k, s in enumerate(same) if not s), None if len(a) == len(b)
                                          else min(len(a), len(b)))}


def describe_step(cap: dict, k: int) -> str:
    if k >= len(cap["steps"]):
        return "(finished)"
    s = cap["steps"][k]
    text = ", ".join(f"r{i}:{n}" for i, n in sorted((i, n) for i, n, _ in s["sched"]))
    return text + (f"; preempted {', '.join(f'r{i}' for i in s['preempted'])}" if s["preempted"] else "")


def report(folder: Path) -> str:
    lines = ["# The surgery room: the same traces through vLLM and InferLab", ""]
    for name in SCENARIOS:
        v, m = load(folder, "vllm", name), load(folder, "inferlab", name)
        c = compare(v, m)
        knobs = {k: v["knobs"][k] for k in ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs")}
        lines += [f"## Scenario `{name}` ({v['engine']} against {m['engine']})", "",
                  f"{len(v['outputs'])} requests at once, {json.dumps(knobs)}.", "",
                  "| | vLLM | InferLab |", "|---|---|---|"]
        lines += [f"| {key} | {c['summary']['vllm'][key]:,} | {c['summary']['inferlab'][key]:,} |"
                  for key in c["summary"]["vllm"]]
        diffs = [f"r{i} from token {d}" for i, d in enumerate(c["first_token_difference"]) if d is not None]
        lines += ["", "Greedy outputs (float32): " + ("identical, token for token, for every request."
                                                      if c["outputs_identical"] else "differ: " + ", ".join(diffs)),
                  f"Per-step batches: {c['identical_steps']} of {max(c['steps'])} steps identical."]
        k = c["first_step_difference"]
        if k is not None:
            lines += [f"First difference at step {k + 1}: vLLM {describe_step(v, k)} / InferLab {describe_step(m, k)}."]
        lines.append("")
    v, m = load(folder, "vllm", "oom"), load(folder, "inferlab", "oom")
    lines += ["## Out of KV memory", "", f"A pool of {v['knobs']['num_blocks']} blocks of {v['knobs']['block_size']} "
              f"tokens under max_model_len {v['knobs']['max_model_len']}:", "",
              f"- vLLM, at start: `{v['startup_error']}`",
              f"- InferLab starts (it caps a request at the pool); a {v['knobs']['prompt_len']}-token prompt: "
              f"`{m['paged_error']}`",
              f"- InferLab with `kv_allocation=\"reserve\"`, a second request: `{m['reserve_error']}`",
              f"- a prompt past max_model_len, vLLM: `{load(folder, 'vllm', 'cache')['too_long_error']}`",
              f"- the same, InferLab: `{load(folder, 'inferlab', 'cache')['too_long_error']}`", ""]
    return "\n".join(lines)


def scope_trace(cap: dict) -> list[dict]:
    """The capture as a dashboard trace (header, then one frame per step), so `inferlab scope
    --replay` draws vLLM's timeline exactly as it draws InferLab's. Request states are replayed
    from the batches: every request runs to exactly max_tokens (ignore_eos)."""
    from inferlab.scope.frames import LATENCY_BUCKETS, TRACE_VERSION
    knobs, nb = cap["knobs"], cap["num_blocks"]
    prompts, max_tokens = knobs["prompt_lens"], knobs["max_tokens"]
    budget = knobs["max_num_batched_tokens"]
    header = {"type": "header", "version": TRACE_VERSION, "mode": "replay", "engine": cap["engine"],
              "config": {"scheduling_policy": "fcfs", "max_num_batched_tokens": budget,
                         "max_num_seqs": knobs["max_num_seqs"], "enable_prefix_caching": True},
              "num_blocks": nb, "block_size": cap["block_size"], "latency_buckets": list(LATENCY_BUCKETS)}
    live = {i: {"id": f"r{i}", "state": "waiting", "priority": 0, "computed": 0, "prompt": p, "output": 0,
                "max_tokens": max_tokens, "preemptions": 0, "blocks": []} for i, p in enumerate(prompts)}
    frames, prefill_total, generated, preemptions, seen = [header], 0, 0, 0, 0
    zeros = [0] * (len(LATENCY_BUCKETS) + 1)
    for k, s in enumerate(expand(cap["steps"])):
        for i in s["preempted"]:
            live[i].update(state="preempted", computed=0, preemptions=live[i]["preemptions"] + 1)
        for i, n, before in s["sched"]:
            r = live[i]
            r.update(state="running", computed=before + n)
            if before + n >= r["prompt"]:
                seen += r["prompt"] if r["output"] == 0 else 0  # whole prompts at their first token, as vLLM counts
                r["output"] = before + n - r["prompt"] + 1
                generated += 1
        tables = dict((i, t) for i, t in s["tables"])
        for i, r in live.items():
            r["blocks"] = tables.get(i, [])
        prefill, decode = split(cap, s)
        prefill_total += prefill
        preemptions += len(s["preempted"])
        cells, q_h = s["cells"], s["prefix"]
        frames.append({
            "type": "frame", "t": s["t"], "step": k + 1, "num_preemptions": preemptions,
            "num_running": sum(r["state"] == "running" for r in live.values()),
            "num_waiting": sum(r["state"] != "running" for r in live.values()),
            "kv": {"num_blocks": nb, "block_size": cap["block_size"], "free": s["free"], "usage": 1 - s["free"] / nb,
                   "prefix_queries": q_h[0], "prefix_hits": q_h[1], "evictions": 0, "cells": cells, "hashes": [],
                   "shared": sum(c for st, c in cells if st > 1), "cached_free": sum(c for st, c in cells if st < 0)},
            "batch": {"prefill": prefill, "decode": decode, "budget": budget, "seqs": len(s["sched"]),
                      "preempted": len(s["preempted"])},
            "requests": [dict(r) for r in live.values()], "num_prompt_tokens": prefill_total,
            "num_prompt_tokens_seen": seen, "num_generation_tokens": generated, "last_step_tokens": prefill + decode,
            "steps": [[k + 1, s["t"], prefill, decode, budget, len(s["preempted"])]],
            "latency": {"ttft": zeros, "itl": zeros}})
        live = {i: r for i, r in live.items() if r["output"] < max_tokens}  # finished after this step
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captures", default=str(HERE / "captures"))
    ap.add_argument("--out", default=str(HERE / "results.md"))
    ap.add_argument("--scope", default=None, metavar="DIR", help="also write <engine>-<scenario>.jsonl traces here")
    a = ap.parse_args()
    Path(a.out).write_text(report(Path(a.captures)) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    if a.scope:
        Path(a.scope).mkdir(parents=True, exist_ok=True)
        for engine in ENGINES:
            for name in SCENARIOS:
                path = Path(a.scope, f"{engine}-{name}.jsonl")
                frames = scope_trace(load(Path(a.captures), engine, name))
                path.write_text("".join(json.dumps(f, separators=(",", ":")) + "\n" for f in frames))
                print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
