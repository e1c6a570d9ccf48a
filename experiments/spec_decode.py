"""Experiment 11: speculative decoding — acceptance and speedup against k and batch size, both proposers.

Claim tested: "speculative decoding speeds up decoding 1.5-5x". The target is SmolLM2-135M with
dense fp32 weights (`quantization="none"`), whose decode step streams 540 MB of weights; the
workload edits passages given in the prompt (`inferlab bench --workload edit`), greedy, so the
answers copy much of their prompt. Proposers: n-gram prompt lookup (min 2, max 4), and the
embedded Q4_1 GGUF with int8 activations drafting for the fp32 target (a quantized self-draft,
about 7x fewer bytes a step, reading the K/V the target computed). Each configuration's greedy
output is checked token for token against decoding without speculation. Single-stream decode
speed excludes the prefill (time from a request's first token to its last); batch runs report
output tokens per second of wall time.
"""
from __future__ import annotations

import time

from common import SMOKE, figure, parse_args, table, write

from inferlab.bench_text import edit_workload
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.sampling_params import SamplingParams


def models(smoke: bool):
    """(target, draft): fp32 dense target and its Q4_1 int8 self-draft; tiny random ones for --smoke."""
    import torch
    if smoke:
        from common import embedded_model
        tiny = embedded_model()
        return tiny, tiny
    from inferlab.model.loader import load_model
    cpu = torch.device("cpu")
    return load_model(None, "float32", cpu, "none"), load_model(None, "float32", cpu, "auto", int8_activations=True)


def measure(target, draft, spec: dict | None, prompts: list[list[int]], batch: int, max_tokens: int,
            threads: int) -> dict:
    """Run `prompts` with at most `batch` at once; decode speed, throughput, acceptance, the outputs."""
    eng = LLMEngine(EngineConfig(speculative_config=spec, max_num_seqs=batch, num_threads=threads,
                                 num_kv_blocks=4096), loaded=target, draft_loaded=draft if spec else None)
    eng.add_request("warm-up", {"prompt_token_ids": prompts[0][:16]}, SamplingParams(max_tokens=4))
    while eng.has_unfinished_requests():
        eng.step()
    # a smoke run's random model may pick an end token at once (its vocabulary has two): run on
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=SMOKE)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, params)
    first: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    decode_time = decode_tokens = 0.0
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
                decode_time += now - first[out.request_id]
                decode_tokens += len(out.outputs[0].token_ids) - 1
    wall = time.perf_counter() - start
    s = eng.snapshot().get("spec_decode") or {}
    return {"outputs": [outputs[str(i)] for i in range(len(prompts))],
            "decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
            "tok_s": sum(len(o) for o in outputs.values()) / wall,
            "acceptance": s.get("acceptance_rate"), "accepted_len": s.get("mean_accepted_length")}


def main() -> None:
    a = parse_args(__doc__)
    threads = a.threads or 1
    target, draft = models(a.smoke)
    prompts = [r["prompt_token_ids"] for r in edit_workload(target[1])["requests"]]
    max_tokens = 16 if a.smoke else 128
    single = prompts[::4][:2 if a.smoke else 4]  # four passages, the three tasks in turn
    ks = [1, 2, 4] if a.smoke else [2, 4, 8]
    configs = [("ngram", {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4}),
               ("draft Q4_1", {"method": "draft_model", "model": "embedded Q4_1 GGUF", "int8_activations": True,
                              "share_kv": True})]  # it is the target's own checkpoint: it reads its K/V
    rows = []
    base = measure(target, draft, None, single, 1, max_tokens, threads)
    rows.append(["single stream", "off", "-", 1, "-", "-", round(base["decode_tok_s"], 1), "1.00x", "-"])
    curves: dict[str, list[float]] = {}
    for name, spec in configs:
        for k in ks:
            r = measure(target, draft, {**spec, "num_speculative_tokens": k}, single, 1, max_tokens, threads)
            speedup = r["decode_tok_s"] / base["decode_tok_s"]
            curves.setdefault(name, []).append(speedup)
            rows.append(["single stream", name, k, 1, f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-",
                         f"{r['accepted_len']:.2f}" if r["accepted_len"] else "-", round(r["decode_tok_s"], 1),
                         f"{speedup:.2f}x", "yes" if r["outputs"] == base["outputs"] else "NO"])
    batches = [2, 4] if a.smoke else [4, 12]
    by_batch: dict[str, list[float]] = {}
    for b in batches:
        batch_prompts = (prompts * 4)[:2 * b]
        off = measure(target, draft, None, batch_prompts, b, max_tokens, threads)
        rows.append(["batch", "off", "-", b, "-", "-", round(off["tok_s"], 1), "1.00x", "-"])
        for name, spec in configs:
            # the batch-size rule lifted, to see what speculation does at each size
            r = measure(target, draft, {**spec, "num_speculative_tokens": 4, "disable_by_batch_size": 64},
                        batch_prompts, b, max_tokens, threads)
            speedup = r["tok_s"] / off["tok_s"]
            by_batch.setdefault(name, []).append(speedup)
            rows.append(["batch", name, 4, b, f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-",
                         f"{r['accepted_len']:.2f}" if r["accepted_len"] else "-", round(r["tok_s"], 1),
                         f"{speedup:.2f}x", "yes" if r["outputs"] == off["outputs"] else "NO"])
    fig, axes = figure(2, 4.5)
    for name, ys in curves.items():
        axes[0][0].plot(ks, ys, marker="o", label=name)
    axes[0][0].set_xlabel("k (draft tokens a step)")
    axes[0][0].set_ylabel("single-stream decode speedup")
    for name, ys in by_batch.items():
        axes[0][1].plot(batches, ys, marker="o", label=name)
    axes[0][1].set_xlabel("requests decoding at once (k = 4, batch rule lifted)")
    axes[0][1].set_ylabel("throughput speedup")
    for ax in axes[0]:
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhspan(1.5, 5.0, color="tab:green", alpha=0.08, label="claimed 1.5-5x")
        ax.legend(fontsize=8)
    best = {name: max(ys) for name, ys in curves.items()}
    text = (f"Single stream on the edit workload: n-gram up to {best['ngram']:.2f}x, the Q4_1 self-draft up to "
            f"{best['draft Q4_1']:.2f}x the decode speed without speculation; at {batches[-1]} requests at once "
            f"(rule lifted) {by_batch['ngram'][-1]:.2f}x and {by_batch['draft Q4_1'][-1]:.2f}x.")
    headers = ["run", "proposer", "k", "batch", "acceptance", "tokens/verify", "tok/s", "speedup", "same output"]
    write(a.out, "spec_decode", "Speculative decoding: acceptance and speedup against k and batch size",
          [__doc__.split("\n\n", 1)[1].strip(), table(headers, rows), text], fig)


if __name__ == "__main__":
    main()
