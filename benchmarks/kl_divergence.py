"""How far each way of running a model moves its next-token distributions, llama.cpp's
`--kl-divergence` measure: over a few thousand tokens of real text, the mean KL divergence from the
reference (the same model with every weight dequantized to fp32 and fp32 activations), the share of
positions whose top token agrees with it, and each mode's perplexity on the text.

    .venv/bin/python benchmarks/kl_divergence.py [--text FILE] [--tokens 4096] [--model X.gguf] \\
        [--mode auto] [--mode q8_0:float32+int8] [--mode none:bfloat16] [--file other.gguf]

A mode is `quantization[:dtype][+int8]` on the reference's file (dtype: default `auto`, this CPU's
default, which the table names; `+int8`: int8 activations), or
`--file PATH` runs another GGUF as it is stored (its own weights, e.g. llama.cpp's Q4_K_M of the same
model), at `--file-dtype` (default `auto`). The default text is the GPL-3's
(Debian ships it in /usr/share/common-licenses): plain English, the same on every machine.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from inferlab import EngineConfig, LLMEngine
from inferlab.cli_args import positive_int
from inferlab.config import DTYPES
from inferlab.model.layers import AttentionMetadata, PrefillSeq
from inferlab.model.layers.keep import QUANTIZATIONS

WINDOW = 512


def window_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """fp32 log-probabilities at every position of one fresh sequence (nothing cached)."""
    n, bs = len(ids), engine.config.block_size
    table = torch.arange(-(-n // bs))
    meta = AttentionMetadata(torch.arange(n), [PrefillSeq(0, n, n, table)])
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(ids), torch.arange(n), engine.runner.kv_caches, meta)
        return torch.log_softmax(engine.model.compute_logits(hidden).float(), dim=-1)


def evaluate(engine: LLMEngine, windows: list[list[int]], reference: list[torch.Tensor] | None):
    kl, agree, nll, count = 0.0, 0, 0.0, 0
    outs = []
    for i, ids in enumerate(windows):
        logp = window_logits(engine, ids)
        outs.append(logp)
        nll -= logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        if reference is not None:
            ref = reference[i]
            kl += (ref.exp() * (ref - logp)).sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        count += len(ids)
    return outs, kl / count, agree / count, math.exp(nll / (count - len(windows)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=positive_int, default=4096, help="at least 2: each position predicts the next")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--mode", action="append", default=None,
                    help="quantization[:dtype][+int8], e.g. auto, q8_0+int8, auto:float32, none:bfloat16 (repeatable)")
    ap.add_argument("--file", action="append", default=[], help="another GGUF of the same model, run as stored")
    ap.add_argument("--file-dtype", default="auto", choices=DTYPES, help="activations of the --file runs")
    a = ap.parse_args()
    if a.tokens < 2:
        ap.error("--tokens must be at least 2: each position predicts the next")
    modes = [m.lower() for m in a.mode] if a.mode else [
        "auto:float32", "auto:float32+int8", "q8_0:float32", "q8_0:float32+int8", "q4_0:float32",
        "q4_0:float32+int8", "auto:bfloat16"]
    for m in modes:
        quantization, _, dtype = m.removesuffix("+int8").partition(":")
        if quantization not in QUANTIZATIONS or dtype not in ("", *DTYPES):
            ap.error(f"--mode {m!r}: expected quantization[:dtype][+int8], quantization one of {QUANTIZATIONS}, "
                     f"dtype one of {DTYPES}")
    for path in [a.text, *a.file] + ([a.model] if a.model else []):
        if not os.path.exists(path):
            ap.error(f"no such file: {path}")

    def engine(model: str | None, quantization: str, dtype: str, int8: bool = False) -> LLMEngine:
        return LLMEngine(EngineConfig(model=model, quantization=quantization, dtype=dtype, int8_activations=int8,
                                      num_kv_blocks=WINDOW // 16 + 1, max_num_batched_tokens=WINDOW))

    ref_engine = engine(a.model, "none", "float32")
    text = open(a.text, encoding="utf-8").read()
    ids = ref_engine.tokenizer.encode(text)[:a.tokens]
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW)]
    reference, _, _, ref_ppl = evaluate(ref_engine, windows, None)
    del ref_engine
    print(f"{len(ids)} tokens of {a.text} in windows of {WINDOW}; "
          f"reference: dequantized fp32, perplexity {ref_ppl:.3f}")
    print("| mode | mean KL divergence | top-1 agreement | perplexity |\n|---|---|---|---|")
    runs = []
    for m in modes:
        base, int8 = m.removesuffix("+int8"), m.endswith("+int8")
        quantization, _, dtype = base.partition(":")
        dtype = dtype or "auto"
        runs.append((f"--quantization {quantization}", a.model, quantization, dtype, int8))
    runs += [(f"--model {f}", f, "auto", a.file_dtype, False) for f in a.file]
    for label, model, quantization, dtype, int8 in runs:
        run = engine(model, quantization, dtype, int8)
        # the dtype as it ran: `auto` is this CPU's default (bf16 where it has bf16 units)
        label += f" --dtype {str(run.dtype).removeprefix('torch.')}" + (" --int8-activations" if int8 else "")
        _, kl, agree, ppl = evaluate(run, windows, reference)
        # a KL divergence is never negative; rounding gives -1e-9 where two runs are the same
        print(f"| {label} | {max(kl, 0.0):.5f} | {100 * agree:.2f}% | {ppl:.3f} |")
        del run


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a model that does not load, a bad mode for it: one line
        sys.exit(f"error: {e}")
