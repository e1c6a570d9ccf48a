"""A kernel change against the build before it, in one process: both libraries multiply the same
weights and inputs, alternating, so a machine whose speed moves between runs moves both alike.
Prints, per (weight type, rows), the best time of each over `--repeat` rounds of `--layers`
matmuls, and whether the outputs are the same bits.

    git worktree add /tmp/before HEAD~1   # the code before the change
    BEFORE=$(PYTHONPATH=/tmp/before .venv/bin/python -c "from inferlab import kernels; print(kernels.build())")
    .venv/bin/python benchmarks/linear_ab.py --before "$BEFORE" --isa avx2 --types q6_K,q4_K [--int8]

The shape defaults to the embedded model's `ffn_down` (K 1536, N 576), 30 of them as in a step.
"""
from __future__ import annotations

import argparse
import ctypes
import time

import torch

from inferlab import kernels
from inferlab.cli_args import positive_int, positive_ints
from inferlab.model.layers import quant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the kernel library (.so) to compare against")
    ap.add_argument("--isa", default=None, help="default: the best this CPU runs")
    ap.add_argument("--types", default="q4_K,q6_K")
    ap.add_argument("--rows", type=positive_ints, default="1,4,64")
    ap.add_argument("--shape", type=positive_ints, default="1536,576", help="K,N")
    ap.add_argument("--layers", type=positive_int, default=30)
    ap.add_argument("--repeat", type=positive_int, default=7)
    ap.add_argument("--int8", action="store_true", help="int8 activations")
    args = ap.parse_args()
    if len(args.shape) != 2:
        ap.error(f"--shape must be K,N, got {len(args.shape)} numbers")
    for name in args.types.split(","):
        if name.lower() not in quant.BY_NAME or not quant.BY_NAME[name.lower()].native:
            ap.error(f"--types: {name!r} is not a block type the kernels multiply (regrouped ones are not timed here)")
        if args.shape[0] % quant.BY_NAME[name.lower()].block:
            ap.error(f"--shape: K = {args.shape[0]} does not split into {name}'s blocks of "
                     f"{quant.BY_NAME[name.lower()].block}")
    torch.set_num_threads(1)
    isa = args.isa or kernels.native().isa
    libs = {"before": kernels.Kernels(ctypes.CDLL(args.before), isa),
            "after": kernels.Kernels(ctypes.CDLL(str(kernels.build())), isa)}
    act = kernels.C["IL_ACT_INT8" if args.int8 else "IL_ACT_FLOAT"]
    K, N = args.shape
    rows = args.rows
    print(f"ISA {isa}, {args.layers} matmuls of {K} x {N}, {'int8' if args.int8 else 'fp32'} activations, ms")
    print("| type | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in args.types.split(","):
        wtype = quant.BY_NAME[name.lower()]
        w = quant.random_stored(wtype, N, K, seed=1)
        cells = []
        for r in rows:
            x = torch.randn(r, K)
            ys = {v: torch.empty(r, N) for v in libs}
            best = {v: float("inf") for v in libs}
            for _ in range(args.repeat):
                for v, k in libs.items():
                    t = time.perf_counter()
                    for _ in range(args.layers):
                        k.linear(x, K, w, wtype.code, None, ys[v], N, r, K, N, 0, 0, act)
                    best[v] = min(best[v], time.perf_counter() - t)
            same = "" if torch.equal(ys["before"], ys["after"]) else " (outputs differ)"
            cells.append(f"{best['before'] * 1e3:.1f} -> {best['after'] * 1e3:.1f}{same}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
