"""Speed of the linear kernel per weight type and row count, against PyTorch's matmul on the same
(dequantized) weights: the embedded model's layer shapes, fastest of several runs.

    .venv/bin/python benchmarks/linear_speed.py [--isa avx2] [--threads 2] [--types f32,q4_1]
        [--rows 1,16,64,512] [--int8] [--dtype bfloat16]

(`--types q4_1x16,bf16 --isa avx512 --dtype bfloat16`: the regrouped blocks against bf16 weights;
`--types q4_1t16,bf16 --isa amx --dtype bfloat16`: the blocks the AMX tiles decode, against the same;
`--types bf16x16,bf16 --isa avx512 --dtype bfloat16`: bf16 weights in the blocks' pair rows, against bf16 rows.)

Prints, per (type, rows): ms per call for the 120 layer matmuls of one step (qkv, o, gate/up, down
of 30 layers), the GFLOP/s that makes, the weight bytes read per second, and PyTorch's time on the
dequantized weights in the activations' dtype (`--dtype`, fp32 by default). The four matrices are
the same for every layer, so where the CPU's last-level cache holds them (a 32 MB L3 holds even the
fp32 ones: 14 MB) this measures the arithmetic; a whole model's weights stream from memory.
"""
from __future__ import annotations

import argparse
import time

import torch

from inferlab import kernels
from inferlab.cli_args import positive_int, positive_ints
from inferlab.model.layers import quant, regroup, tiles
from inferlab.model.layers.linear import linear

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (K, N) of qkv, o, gate/up, down


def best_of(fn, repeat: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", default=None, help="default: the best this CPU runs")
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--types", default="f32,bf16,f16,q8_0,q4_0,q4_1,q5_0,q4_K,q6_K")
    ap.add_argument("--rows", type=positive_ints, default="1,4,16,64,256")
    ap.add_argument("--layers", type=positive_int, default=30)
    ap.add_argument("--repeat", type=positive_int, default=5)
    ap.add_argument("--int8", action="store_true", help="int8 activations where the weight type has them")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activations")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU seconds (with --threads 1: what a kernel costs on a busy machine)")
    a = ap.parse_args()
    known = {t.name.lower(): t for t in (*quant.TYPES, *quant.REGROUPED.values(), quant.BF16X16, *quant.TILED.values())}
    for name in a.types.split(","):
        if name.lower() not in known or not known[name.lower()].native:
            ap.error(f"--types: {name!r} is not a type the kernels multiply; one of {', '.join(known)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        k = kernels.for_isa(a.isa) if a.isa else kernels.native()
    except ValueError as e:  # an ISA this CPU cannot run, or no such ISA
        ap.error(f"--isa: {e}")
    kernels.native = lambda: k  # the layers' dispatcher uses this ISA
    print(f"ISA {k.isa}, {torch.get_num_threads()} threads; {a.layers} layers x {len(SHAPES)} matmuls per step")
    dtype = getattr(torch, a.dtype)
    print(f"| type | rows | ms | GFLOP/s | weight GB/s | torch {a.dtype} ms |\n|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name in a.types.split(","):
        wtype = known[name.lower()]
        layers, shapes = [], [(kk, n) for kk, n in SHAPES if kk % wtype.block == 0]
        if len(shapes) < len(SHAPES):
            print(f"| {name} | (only the shapes whose rows split into its {wtype.block}-weight blocks) | | | | |")
        for kk, n in shapes:
            dense = torch.randn(n, kk, generator=g) * kk ** -0.5
            if wtype.base:  # a regrouped type (q4_1x16, q4_1t16...): the GGUF type's blocks, moved
                base = wtype.base
                blocks = quant.quantize(dense, base) if base.quantizable else quant.random_stored(base, n, kk, n + kk)
                stored = (tiles.repack if wtype in quant.TILED.values() else regroup.repack)(blocks, base)
            elif wtype.dtype or wtype.quantizable:
                stored = quant.quantize(dense, wtype)
            else:
                stored = quant.random_stored(wtype, n, kk, seed=n + kk)
            layers.append((stored, quant.dequantize(stored, wtype).to(dtype)))
        weight_bytes = sum(w.numel() * w.element_size() for w, _ in layers) * a.layers
        flops_per_row = 2 * sum(kk * n for kk, n in shapes) * a.layers
        for rows in a.rows:
            xs = {kk: torch.randn(rows, kk, generator=g).to(dtype) for kk, _ in shapes}

            calls = [(xs[kk], w, d) for (w, d), (kk, _) in zip(layers, shapes)] * a.layers

            def ours(calls=calls, wtype=wtype):
                for x, w, _ in calls:
                    linear(x, w, wtype, int8=a.int8)

            def theirs(calls=calls):
                for x, _, d in calls:
                    torch.nn.functional.linear(x, d)
            ours()
            clock = time.process_time if a.cpu_time else time.perf_counter
            t, tt = best_of(ours, a.repeat, clock), best_of(theirs, a.repeat, clock)
            print(f"| {name} | {rows} | {1e3 * t:.1f} | {rows * flops_per_row / t / 1e9:.0f} | "
                  f"{weight_bytes / t / 1e9:.1f} | {1e3 * tt:.1f} |")


if __name__ == "__main__":
    main()
