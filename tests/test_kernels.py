"""The native kernels of every ISA this CPU runs, against their PyTorch references and against the
portable C (`generic`): attention, the elementwise ops, argmax; and the build and dispatch around
them (every ISA's files compile on any x86 machine and ship in the package, INFERLAB_ISA forces one,
failures fall back)."""
from __future__ import annotations

import ast
import fnmatch
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from inferlab import kernels
from inferlab.kernels import builder
from inferlab.model.layers import activation, attention, norm, rotary


def _runnable() -> list[str]:
    loaded = kernels.library()
    return loaded[1] if loaded else []


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _reference(q, k_cache, v_cache, rows, seqs, lens, tables, scale):
    """Per row: gather its visible keys through the block table, softmax in fp64."""
    heads = q.shape[1]
    _, bs, kvh, d = k_cache.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r, s, n in zip(rows.tolist(), seqs.tolist(), lens.tolist()):
        slots = torch.tensor([tables[s, t // bs] * bs + t % bs for t in range(n)])
        k = k_cache.reshape(-1, kvh, d)[slots].double().repeat_interleave(heads // kvh, dim=1)  # [n, heads, d]
        v = v_cache.reshape(-1, kvh, d)[slots].double().repeat_interleave(heads // kvh, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[r].double(), k) * scale).softmax(-1)
        out[r] = torch.einsum("hn,nhd->hd", p, v)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
# the last three: AMX row kernel shapes (block 32, one head per KV head) and one past its 16 heads
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 128, 1), (8, 2, 80, 7),
                                                                (16, 4, 64, 32), (12, 12, 64, 16), (32, 8, 64, 16),
                                                                (4, 2, 36, 8)])
def test_paged_attention_matches_attention_math(isa, dtype, tol, heads, kv_heads, head_dim, block_size):
    k = kernels.for_isa(isa)
    g = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks = 300 // block_size + 40
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    # decodes (one of a single key) and a prefill chunk of 5 rows over a prefix; 12 rows in all, so
    # kernels that take a task per row from 8 rows run too
    ctx = [1, 150, 97] + [20 + 9 * i for i in range(7)]
    width = max(-(-c // block_size) for c in ctx)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in ctx]).int()
    seqs = torch.tensor([0, 1, 2, 2, 2, 2, 2, *range(3, 10)], dtype=torch.int32)
    lens = torch.tensor([1, 150, 93, 94, 95, 96, 97, *ctx[3:]], dtype=torch.int32)  # causal within the chunk
    rows = torch.arange(len(seqs))
    q = torch.randn(len(seqs) + 1, heads, head_dim, generator=g).to(dtype)  # the last row is not asked for
    scale = head_dim ** -0.5
    expected = _reference(q, k_cache, v_cache, rows, seqs, lens, tables, scale)
    for n in (len(seqs), 1):
        out = torch.full_like(q, 7.0)
        k.paged_attention(q, q.stride(0), k_cache, v_cache, out, rows[:n], seqs[:n], lens[:n], n, tables,
                          tables.shape[1], heads, kv_heads, head_dim, block_size, scale, kernels.DTYPE_CODES[dtype])
        torch.testing.assert_close(out[:n].double(), expected[:n], atol=tol, rtol=tol)
        assert torch.all(out[n:] == 7.0), "rows not asked for must be left alone"


def test_attention_does_not_depend_on_the_thread_count(isa):
    k = kernels.for_isa(isa)
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(40, 16, 3, 64, generator=g).bfloat16() for _ in range(2))
    tables = torch.randperm(40, generator=g)[:30].view(3, 10).int()
    q = torch.randn(3, 9, 64, generator=g).bfloat16()
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = torch.empty_like(q)
        k.paged_attention(q, q.stride(0), k_cache, v_cache, out, torch.arange(3), torch.arange(3, dtype=torch.int32),
                          torch.tensor([150, 7, 160], dtype=torch.int32), 3, tables, 10, 9, 3, 64, 16, 0.125,
                          kernels.DTYPE_CODES[torch.bfloat16])
        outs.append(out)
    assert torch.equal(*outs)


@pytest.mark.parametrize("heads,kv_heads,block_size", [(9, 3, 16), (16, 4, 32), (12, 12, 16)])
def test_a_long_decode_row_keeps_its_bits_alone_in_a_batch_and_on_any_thread_count(isa, heads, kv_heads, block_size):
    """Past 512 keys the AMX kernel sums a row in pieces (over every thread where the call has one row,
    one after another within the row's task otherwise), and the other kernels split a call's rows by
    their count: a row's result must still follow from the row alone, and match the attention math."""
    k = kernels.for_isa(isa)
    g = torch.Generator().manual_seed(11)
    width = 2000 // block_size + 1
    k_cache, v_cache = (torch.randn(9 * width + 30, block_size, kv_heads, 64, generator=g).bfloat16() for _ in range(2))
    tables = torch.randperm(9 * width + 30, generator=g)[:9 * width].view(9, width).int()
    q = torch.randn(9, heads, 64, generator=g).bfloat16()
    lens = torch.tensor([2000, 513, 1100, 40, 512, 700, 1, 90, 1500], dtype=torch.int32)
    rows, seqs = torch.arange(9), torch.arange(9, dtype=torch.int32)
    expected = _reference(q, k_cache, v_cache, rows, seqs, lens, tables, 0.125)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            for n in (1, 3, 9):  # 9: past the AVX-512 kernel's 8 rows split by KV head
                out = torch.zeros_like(q)
                k.paged_attention(q, q.stride(0), k_cache, v_cache, out, rows[:n], seqs[:n], lens[:n], n, tables,
                                  width, heads, kv_heads, 64, block_size, 0.125, kernels.DTYPE_CODES[torch.bfloat16])
                outs.append(out[:1])
                torch.testing.assert_close(out[:n].double(), expected[:n], atol=2e-2, rtol=2e-2)
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 128), (8, 8, 64), (4, 1, 32)])
def test_a_decode_row_does_not_depend_on_the_rows_beside_it(isa, dtype, heads, kv_heads, head_dim):
    """A request's tokens must not change with how many others decode beside it: every row count a
    kernel splits differently (a task per row and KV head below some count, per row above) gives
    each row the same bits."""
    k = kernels.for_isa(isa)
    g = torch.Generator().manual_seed(heads + head_dim)
    k_cache, v_cache = (torch.randn(20 * 6, 16, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(120, generator=g).view(20, 6).int()
    q = torch.randn(20, heads, head_dim, generator=g).to(dtype)
    lens = torch.randint(1, 96, (20,), generator=g, dtype=torch.int32)
    outs = {}
    for rows in (1, 2, 3, 4, 7, 8, 9, 16, 20):
        out = torch.empty_like(q)
        k.paged_attention(q, q.stride(0), k_cache, v_cache, out, torch.arange(rows),
                          torch.arange(rows, dtype=torch.int32), lens, rows, tables, 6, heads, kv_heads, head_dim, 16,
                          head_dim ** -0.5, kernels.DTYPE_CODES[dtype])
        outs[rows] = out[:rows]
    for rows, out in outs.items():
        assert torch.equal(out[0], outs[1][0]), f"row 0 alone and among {rows} rows differ"
        assert torch.equal(out, outs[20][:rows]), f"the first {rows} rows differ from the same rows among 20"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 128, 32), (8, 2, 64, 16),
                                                                (6, 2, 40, 5)])
def test_prefill_kernel_matches_attention_math(isa, dtype, tol, heads, kv_heads, head_dim, block_size):
    k = kernels.for_isa(isa)
    if not attention.prefill_kernel_runs(k, dtype, heads, kv_heads, head_dim, block_size):
        pytest.skip(f"the {isa} kernels have no matrix-product prefill attention for this shape: SDPA runs it")
    g = torch.Generator().manual_seed(head_dim + block_size)
    num_blocks = 200
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    # (queries, keys): fresh prompts of 37 and 5 tokens, chunks of 40, 16 and 1 over cached prefixes
    spec = [(37, 37), (5, 5), (40, 140), (16, 32), (1, 50)]
    width = max(-(-keys // block_size) for _, keys in spec)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in spec]).int()
    q = torch.randn(sum(n for n, _ in spec) + 3, heads, head_dim, generator=g).to(dtype)  # 3 rows not asked for
    row0, rows, seqs, lens = [], [], [], []
    for i, (n, keys) in enumerate(spec):
        row0.append(len(rows))
        rows += range(len(rows), len(rows) + n)
        seqs += [i] * n
        lens += range(keys - n + 1, keys + 1)  # causal: query t sees keys up to its own position
    out = torch.full_like(q, 7.0)
    k.prefill_attention(q, q.stride(0), k_cache, v_cache, out, torch.tensor(row0),
                        torch.tensor([n for n, _ in spec], dtype=torch.int32),
                        torch.tensor([k for _, k in spec], dtype=torch.int32),
                        torch.arange(len(spec), dtype=torch.int32),
                        len(spec), tables, tables.shape[1], heads, kv_heads, head_dim, block_size, head_dim ** -0.5,
                        kernels.DTYPE_CODES[dtype])
    expected = _reference(q, k_cache, v_cache, torch.tensor(rows), torch.tensor(seqs), torch.tensor(lens), tables,
                          head_dim ** -0.5)
    n = len(rows)
    torch.testing.assert_close(out[:n].double(), expected[:n], atol=tol, rtol=tol)
    assert torch.all(out[n:] == 7.0), "rows not asked for must be left alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (6, 2, 40)])
def test_prefill_kernel_rows_do_not_depend_on_the_chunking(isa, dtype, heads, kv_heads, head_dim):
    """The runner sends every prompt row here, so that a prompt read from the prefix cache, or
    chunked, answers as when computed whole: a row's bits must follow from its position alone, not
    from the chunk it sits in nor the other chunks of the call (whose contexts set the buffers' width)."""
    k = kernels.for_isa(isa)
    if not attention.prefill_kernel_runs(k, dtype, heads, kv_heads, head_dim, 16):
        pytest.skip(f"the {isa} kernels have no matrix-product prefill attention for this shape: SDPA runs it")
    g = torch.Generator().manual_seed(head_dim)
    k_cache, v_cache = (torch.randn(40, 16, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(40, generator=g).view(2, 20).int()  # sequence 0's prompt, a longer sequence 1
    n = 61
    q = torch.randn(n + 300, heads, head_dim, generator=g).to(dtype)

    def run(pieces: list[int], other: int = 0) -> torch.Tensor:
        """Sequence 0's n rows as chunks of these sizes, in one call with `other` rows of sequence 1."""
        row0, count, ctx, seq, at = [], [], [], [], 0
        for size in pieces:
            row0.append(at), count.append(size), ctx.append(at + size), seq.append(0)
            at += size
        if other:
            row0.append(n), count.append(other), ctx.append(300 + other), seq.append(1)
        out = torch.zeros_like(q)
        k.prefill_attention(q, q.stride(0), k_cache, v_cache, out, torch.tensor(row0), torch.tensor(count).int(),
                            torch.tensor(ctx).int(), torch.tensor(seq).int(), len(row0), tables, 20, heads, kv_heads,
                            head_dim, 16, head_dim ** -0.5, kernels.DTYPE_CODES[dtype])
        return out[:n]

    whole = run([n])
    for pieces, other in [([1] * n, 0), ([7, 1, 16, 30, 5, 2], 0), ([60, 1], 0), ([n], 20), ([3, 58], 1)]:
        assert torch.equal(run(pieces, other), whole), f"chunks {pieces} with {other} rows of another sequence"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_rows_do_not_depend_on_the_thread_count(isa, dtype):
    """One long prompt has fewer (chunk, KV head) tasks than threads can take, so the AMX kernel splits
    its queries in parts, as many as the threads call for: the thread count must change no bit."""
    k = kernels.for_isa(isa)
    if not attention.prefill_kernel_runs(k, dtype, 9, 3, 64, 16):
        pytest.skip(f"the {isa} kernels have no matrix-product prefill attention for this shape: SDPA runs it")
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = (torch.randn(60, 16, 3, 64, generator=g).to(dtype) for _ in range(2))
    tables = torch.randperm(60, generator=g).view(2, 30).int()
    q = torch.randn(300, 9, 64, generator=g).to(dtype)
    # a fresh prompt of 200 rows, and a chunk of 100 over a cached prefix of 300 keys
    row0, count, ctx = torch.tensor([0, 200]), torch.tensor([200, 100]).int(), torch.tensor([200, 400]).int()
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            for chunks in (1, 2):  # the long prompt alone (more parts), then with the other chunk
                out = torch.zeros_like(q)
                k.prefill_attention(q, q.stride(0), k_cache, v_cache, out, row0[:chunks], count[:chunks], ctx[:chunks],
                                    torch.arange(chunks).int(), chunks, tables, 30, 9, 3, 64, 16, 0.125,
                                    kernels.DTYPE_CODES[dtype])
                outs.append(out[:200])
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_silu_is_within_a_few_ulp_of_the_exact_value_over_its_whole_range(isa):
    """The kernels' own vectorized e^x (common.h's il_expf; libm's on a CPU without FMA), against SiLU
    in float64: within 3 ulp (measured 1.8-1.9, 2.6 with libm's) wherever e^-x is a float, and past
    that (x < -87) a value as small as the exact one, never NaN (from -88.7 to about -95 every build
    but AVX512-BF16's gave NaN, which a gate's outlier would have spread through the sequence)."""
    a = torch.cat([torch.linspace(-120, 120, 240_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.3, 88.3, 88.5])])
    out = torch.empty_like(a)
    kernels.for_isa(isa).silu_and_mul(out, torch.cat([a, torch.ones_like(a)])[None], 1, a.numel(), kernels.C["IL_F32"])
    exact = a.double() * torch.sigmoid(a.double())
    inside = (a >= -87) & (exact != 0)
    ulps = (out.double() - exact).abs() / (torch.finfo(torch.float32).eps * exact.abs())
    assert ulps[inside].max() <= 3, (ulps[inside].max(), a[inside][ulps[inside].argmax()])
    assert (out[a < -87].abs() <= 1e-35).all(), out[a < -87].abs().max()  # NaN fails this too


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_elementwise_ops_match_their_reference(isa, dtype, tol, monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g).to(dtype)
    residual = torch.randn(37, 96, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    ref_out, ref_sum = norm.rms_norm_ref(x, weight, 1e-6, residual.clone())
    out, new_sum = norm.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(new_sum, ref_sum)  # the sum, exactly as the reference rounds it
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6)[0].float(),
                               norm.rms_norm_ref(x, weight, 1e-6)[0].float(), atol=tol, rtol=tol)
    # the residual stream in fp32 under a bf16 model: added and kept in fp32, the output in weight's dtype
    stream = torch.randn(37, 96, generator=g)
    ref_out, ref_sum = norm.rms_norm_ref(x, weight, 1e-6, stream.clone())
    out, new_sum = norm.rms_norm(x, weight, 1e-6, stream)
    assert out.dtype == dtype and new_sum.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(new_sum, ref_sum)
    first, _ = norm.rms_norm(stream, weight, 1e-6)  # the first layer's norm of the fp32 embedding
    assert first.dtype == dtype
    torch.testing.assert_close(first.float(), norm.rms_norm_ref(stream, weight, 1e-6)[0].float(), atol=tol, rtol=tol)
    heads = torch.randn(37, 5, 96, generator=g).to(dtype)[:, 1:4]  # per-head norms on a strided view (Qwen3)
    torch.testing.assert_close(norm.rms_norm(heads, weight, 1e-6)[0].float(),
                               norm.rms_norm_ref(heads, weight, 1e-6)[0].float(), atol=tol, rtol=tol)

    huge = x[:3].clone()  # a sum of squares past fp32's range: 0, as the reference's rsqrt(inf) (was NaN)
    huge[:, :2] = 3e19
    torch.testing.assert_close(norm.rms_norm(huge, weight, 1e-6)[0], norm.rms_norm_ref(huge, weight, 1e-6)[0])

    gate_up = torch.randn(37, 2 * 80, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(activation.silu_and_mul(gate_up).float(),
                               (torch.nn.functional.silu(gate) * up).float(), atol=tol, rtol=tol)

    # rope on a strided view, as the model does on the fused qkv output: only the view changes
    qkv = torch.randn(37, 5 * 64, generator=g).to(dtype)
    before = qkv.clone()
    q = qkv[:, :3 * 64].view(37, 3, 64)
    freqs = torch.arange(37).float()[:, None] * (10000.0 ** (-torch.arange(32).float() / 32))
    expected = rotary.rope_ref(q.clone(), freqs.cos(), freqs.sin())
    assert rotary.rope(q, freqs.cos(), freqs.sin()).data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qkv[:, :3 * 64].view(37, 3, 64).float(), expected.float(), atol=tol, rtol=tol)
    assert torch.equal(qkv[:, 3 * 64:], before[:, 3 * 64:])


def test_rope_tables_are_exact_and_the_same_wherever_a_position_sits():
    """A step's cos/sin rows are its positions' rows of one table: the correctly rounded cos and sin of
    each fp32 frequency, the same for a position at any row of any step (a long prefill's rows are split
    between threads, and torch's fp32 cos gave some processes other last bits in the second's rows)."""
    import math
    emb = rotary.RotaryEmbedding(64, 100000.0, None)
    positions = torch.cat([torch.arange(n) for n in (5, 90, 20, 1500)])
    cos, sin = emb(positions)
    freqs = positions.float()[:, None] * emb.inv_freq[None, :]
    exact = torch.tensor([[(math.cos(f), math.sin(f)) for f in row] for row in freqs[-1500:].tolist()])
    assert torch.equal(cos[-1500:], exact[..., 0].float()) and torch.equal(sin[-1500:], exact[..., 1].float())
    alone, _ = emb(torch.tensor([1499, 7, 3000]))  # past the table: it grows
    assert torch.equal(alone[:2], cos[[-1, 5 + 7]]) and emb._table[1].shape[0] >= 3001


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_rope_of_a_row_does_not_depend_on_the_rows_beside_it(isa, dtype, head_dim):
    """A row rotated alone and among others, its tables at other addresses, gives the same bits (the
    compiler's two loops, chosen by where the buffers lay, once fused the products differently)."""
    k = kernels.for_isa(isa)
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(12, 3, head_dim, generator=g).to(dtype)
    cos, sin = rotary.RotaryEmbedding(head_dim, 10000.0, None)(torch.randint(0, 4000, (12,), generator=g))
    batch = x.clone()
    k.rope(batch, batch.stride(0), cos, sin, 12, 3, head_dim, kernels.DTYPE_CODES[dtype])
    for r in (0, 5, 11):
        alone = x[r:r + 1].clone()
        k.rope(alone, alone.stride(0), cos[r:r + 1].clone(), sin[r:r + 1].clone(), 1, 3, head_dim,
               kernels.DTYPE_CODES[dtype])
        assert torch.equal(alone[0], batch[r]), f"row {r}"


@pytest.mark.parametrize("rows", [5, 40])  # 40: split over threads
def test_write_kv_matches_index_copy(isa, rows):
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=g).to(torch.bfloat16)
    k = qkv[:, 9 * 64:12 * 64].view(rows, 3, 64)  # strided views, as the model passes them
    v = qkv[:, 12 * 64:].view(rows, 3, 64)
    slots = torch.cat([torch.tensor([7, 0, 33, 34, 12]), torch.randperm(64, generator=g)[:rows - 5] + 64])
    caches = [torch.zeros(8, 16, 3, 64, dtype=torch.bfloat16) for _ in range(4)]
    attention.write_kv(caches[0], caches[1], k, v, slots, kernels.for_isa(isa))
    attention.write_kv(caches[2], caches[3], k, v, slots, None)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 3, 64)[33], k[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [49152, 37, 5])
def test_argmax_matches_torch(isa, dtype, cols):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(6, cols, generator=g).to(dtype)
    x[1] = -x[1].abs() - 1  # all negative: the order of negatives is flipped in the bit trick
    x[2] = float("-inf")
    x[2, cols // 2] = -3.0
    x[3] = 1.0  # all equal: the first index wins
    x[4, cols - 1] = 100.0  # the maximum in the tail
    x[5, :] = -0.5
    x[5, 2] = 0.0
    out = torch.empty(6, dtype=torch.int64)
    kernels.for_isa(isa).argmax(out, x, 6, cols, kernels.DTYPE_CODES[dtype])
    assert torch.equal(out, x.float().argmax(-1))


@pytest.mark.skipif(not builder.X86 or not os.path.exists("/proc/cpuinfo"), reason="Linux on x86 says its features")
def test_the_cpuid_probe_reads_what_linux_reports():
    """The dispatcher reads the CPU by CPUID (any OS, any container); Linux's own reading is the
    check: the same vendor, and each feature the probe names present in both or in neither."""
    vendor, features = kernels._proc_cpuinfo()
    probe = kernels._probe(kernels.library()[0])
    named = set(re.findall(r'"(\w+)"\);', (builder.ROOT / "generic" / "cpu.c").read_text()))
    assert probe[0] == vendor
    assert probe[1] <= named and probe[1] == features & named


def test_the_cpuid_probe_names_every_feature_an_isa_needs():
    """A feature the probe never reports would leave its ISA unused on every CPU."""
    named = set(re.findall(r'"(\w+)"\);', (builder.ROOT / "generic" / "cpu.c").read_text()))
    assert {flag for _, needs in kernels.ISAS.values() for flag in needs} <= named


@pytest.mark.skipif(not builder.X86, reason="the ISA variants are x86's")
def test_every_isa_is_compiled_on_any_x86_machine():
    """The library holds every ISA's own kernels whatever this CPU runs, so a kernel file that stops
    compiling for a CPU family this machine lacks fails here, not on that family's machines."""
    lib, _ = kernels.library()

    def text(src):  # with the .c files it includes (a build of another ISA's file)
        own = src.read_text()
        return own + "".join(text(src.parent / inc) for inc in re.findall(r'^#include "([^"]+\.c)"', own, re.M))

    for isa in kernels.ISAS:
        defined = {name for src in builder.sources(isa) for name in re.findall(r"^\w+ IL\((\w+)\)\(", text(src), re.M)}
        assert defined, isa
        assert not [name for name in defined if not hasattr(lib, f"{name}_{isa}")], isa


def _without_openmp(cc: str) -> str | None:
    """Why `cc` cannot check the kernels here (not installed, or without OpenMP's header), or None."""
    if shutil.which(cc) is None:
        return f"{cc} is not installed (.ci/run installs it)"
    done = subprocess.run([cc, "-fopenmp", "-fsyntax-only", "-x", "c", "-"], input="#include <omp.h>\n",
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"{cc} has no omp.h (for clang, Debian's libomp-dev)"


ARM = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu


@pytest.mark.parametrize("cc", ["gcc", "clang", ARM])
def test_every_kernel_file_compiles_with_gcc_and_clang_without_a_warning(cc, tmp_path):
    """`cc` is clang on some systems, and CC=clang on any. gcc takes code clang refuses (an
    intrinsic's lane number given by a loop variable, which gcc unrolls before it checks), and one
    such header made the whole library fail under clang: every CPU on the PyTorch path. Without a
    warning either (-Wall): the build hides them, and in kernel code they are often bugs. On an ARM
    CPU (a laptop's, a Graviton) the builder compiles the portable kernels alone: gcc for aarch64
    checks they hold no x86 code."""
    if cc != ARM and not builder.X86:
        pytest.skip("the ISA variants are x86's")
    if why := _without_openmp(cc):
        pytest.skip(why)
    from inferlab.kernels.header import tape_calls
    (tmp_path / "tape_calls.h").write_text(tape_calls())
    for isa in ["generic"] if cc == ARM else kernels.ISAS:
        for src in builder.sources(isa):
            done = subprocess.run([cc, *builder.CFLAGS, *builder.ISAS[isa][0], f"-DIL_ISA={isa}",
                                   f"-I{tmp_path}", "-fsyntax-only", str(src)], capture_output=True, text=True)
            error = next((line for line in done.stderr.splitlines() if "error:" in line), done.stderr)
            assert done.returncode == 0, f"{isa} {src.name}: {error}"
            assert "warning:" not in done.stderr, f"{isa} {src.name}: {done.stderr}"


def test_an_installed_package_carries_every_kernel_source():
    """A wheel holds what the package data names, and the kernels compile at first use from there:
    every C file and header (each ISA's folder too) must be named, or a `pip install` without `-e`
    builds no kernels and runs the PyTorch path."""
    config = (Path(kernels.__file__).parents[2] / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    patterns = ast.literal_eval(re.search(r'^"inferlab\.kernels" = (\[.*?\])', config, re.M).group(1))
    files = [src.relative_to(kernels.ROOT).as_posix() for src in kernels.ROOT.rglob("*.[ch]")]
    assert len(files) > 20
    assert [f for f in files if not any(fnmatch.fnmatchcase(f, p) and f.count("/") == p.count("/")
                                        for p in patterns)] == []


def test_bindings_follow_the_header():
    """Each binding's argument count is its prototype's, so a C signature change cannot leave a
    stale ctypes declaration behind; and every ISA the builder compiles has its prototypes declared
    in inferlab.h, which is what makes a definition that differs from api.h a compile error."""
    k = kernels.for_isa("generic")
    for name, (_, params) in kernels.prototypes().items():
        assert len(k.functions[name].argtypes) == len(params), name
        assert params[-1][1] == "num_threads", name
    declared = re.findall(r"#define IL\(name\) IL_CAT\(name, (\w+)\)", (kernels.ROOT / "inferlab.h").read_text())
    assert declared == [*builder.ISAS, "IL_ISA"]  # then a file's own ISA


@pytest.mark.parametrize("declaration, message", [
    ("void IL(my_scale)(float *out, double factor, int num_threads);",
     "my_scale's parameter factor is a double; the bindings take int, int64_t, float and pointers"),
    ("float IL(my_sum)(const float *x, int num_threads);", "my_sum returns float; an entry point returns int"),
])
def test_a_prototype_the_bindings_cannot_take_is_named(monkeypatch, tmp_path, declaration, message):
    """(A double parameter was a KeyError at every start; a float return, an entry point never bound.)"""
    from inferlab.kernels import header
    (tmp_path / "api.h").write_text((kernels.ROOT / "api.h").read_text() + declaration + "\n")
    monkeypatch.setattr(header, "ROOT", tmp_path)
    header.prototypes.cache_clear()
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            header.prototypes()
    finally:
        header.prototypes.cache_clear()


def test_a_call_that_does_not_match_its_prototype_is_refused_before_c_sees_it():
    """ctypes passes an argument too many on (it became num_threads), a tensor for an int as its address,
    and C divides by an unknown weight type's block size of 0: each crashed or misread, now each is named."""
    k = kernels.for_isa("generic")
    out, x = torch.empty(2, 4), torch.randn(2, 8)
    k.silu_and_mul(out, x, 2, 4, kernels.C["IL_F32"])
    with pytest.raises(TypeError, match=r"kernel silu_and_mul takes 5 arguments \(num_threads is added\), got 6"):
        k.silu_and_mul(out, x, 2, 4, kernels.C["IL_F32"], 1)
    with pytest.raises(TypeError, match=r"kernel silu_and_mul: int rows takes a number, got Tensor"):
        k.silu_and_mul(out, x, torch.tensor(2), 4, kernels.C["IL_F32"])
    with pytest.raises(TypeError, match=r"kernel silu_and_mul: void\* out takes a tensor or None, got int"):
        k.silu_and_mul(5, x, 2, 4, kernels.C["IL_F32"])
    with pytest.raises(ValueError, match=r"kernel dequantize: weight type 9 is none of inferlab.h's IL_W_\*"):
        k.dequantize(torch.empty(1, 32), torch.empty(34, dtype=torch.uint8), 9, 1, 32)


def test_dispatch_picks_the_best_isa_per_entry_point():
    best = _runnable()[-1]
    k = kernels.for_isa(best)
    assert k.chosen["tape_run"] == "generic"  # only plain C has it
    if best != "generic":
        assert k.chosen["linear"] != "generic" and k.chosen["paged_attention"] != "generic"
    assert all(c == "generic" for c in kernels.for_isa("generic").chosen.values())


def test_an_isa_this_cpu_lacks_is_never_chosen(monkeypatch):
    """The table is ordered, but not every CPU has every lower ISA: AVX-512 CPUs without bf16
    instructions (avx512f) lack AVX-VNNI, which sits below them. An entry point only a lower ISA the
    CPU lacks implements comes from the next one it runs."""
    class Lib:  # generic has every entry point, avxvnni one of them
        pass
    lib = Lib()
    for name in kernels.prototypes():
        setattr(lib, f"{name}_generic", lambda *a: 0)
    lib.linear_avxvnni = lambda *a: 0
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(kernels.ISAS["avx512f"][1]))
    assert kernels.Kernels(lib, "avx512f").chosen["linear"] == "generic"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {*kernels.ISAS["avx512f"][1], "avx_vnni"})
    assert kernels.Kernels(lib, "avx512f").chosen["linear"] == "avxvnni"


@pytest.mark.skipif(not builder.X86, reason="the ISA variants are x86's")
def test_each_avx512_family_gets_its_own_build(monkeypatch):
    """Skylake-SP (AVX-512, no VNNI) runs avx512f; Cascade Lake and Ice Lake-SP (AVX512-VNNI, no bf16)
    avx512vnni, whose linear layer is its own (the VNNI int8 path) and whose other entry points are
    avx512f's or lower; Zen 4 and Sapphire Rapids without AMX avx512. Judged from the CPU's flags alone."""
    lib, _ = kernels.library()
    skylake = set(kernels.ISAS["avx512f"][1])
    cascade_lake = {*skylake, "avx512_vnni"}
    for flags, best in ((skylake, "avx512f"), (cascade_lake, "avx512vnni"),
                        ({*cascade_lake, "avx512_bf16", "avx_vnni"}, "avx512")):
        assert kernels.runnable_isas(list(kernels.ISAS), flags)[-1] == best
    monkeypatch.setattr(kernels, "cpu_flags", lambda: cascade_lake)
    chosen = kernels.Kernels(lib, "avx512vnni").chosen
    assert chosen["linear"] == "avx512vnni" and chosen["x16_products"] == "avx512f"
    assert not {"avx512", "amx", "avxvnni"} & set(chosen.values())


def test_isa_can_be_forced(monkeypatch):
    def forced(isa: str) -> kernels.Kernels:
        monkeypatch.setenv("INFERLAB_ISA", isa)
        kernels.native.cache_clear()
        try:
            return kernels.native()
        finally:
            kernels.native.cache_clear()
    assert forced("generic").isa == "generic" and forced(" Generic ").isa == "generic"
    with pytest.raises(ValueError, match="^INFERLAB_ISA=avx9: unknown ISA 'avx9'"):
        forced("avx9")
    missing = next((isa for isa in kernels.ISAS if isa not in _runnable()), None)
    if missing is None:  # this CPU runs them all: refused as on a CPU without the best one's flags
        lib, runnable = kernels.library()
        missing, flags = runnable[-1], kernels.cpu_flags()
        lacks = set(kernels.ISAS[missing][1]) - set(kernels.ISAS[runnable[-2]][1])
        monkeypatch.setattr(kernels, "library", lambda: (lib, runnable[:-1]))
        monkeypatch.setattr(kernels, "cpu_flags", lambda: flags - lacks)
        kernels.for_isa.cache_clear()
    try:
        with pytest.raises(ValueError, match=f"^INFERLAB_ISA={missing}: this CPU cannot run the {missing} kernels "
                                             r"\(it lacks "):
            forced(missing)
    finally:
        kernels.for_isa.cache_clear()


def test_a_bad_forced_isa_is_the_settings_error_not_the_model_files(monkeypatch):
    from inferlab.model.loader import load_model
    monkeypatch.setenv("INFERLAB_ISA", "avx9")
    kernels.native.cache_clear()
    try:
        with pytest.raises(ValueError, match="^INFERLAB_ISA=avx9: unknown ISA"):
            load_model(None, "auto", torch.device("cpu"))
    finally:
        kernels.native.cache_clear()


def test_forced_isa_without_bf16_dot_products_defaults_to_fp32(monkeypatch):
    """INFERLAB_ISA=avx2 on an AVX-512 CPU behaves as an AVX2 CPU: bf16 would only be storage there."""
    from inferlab.model.loader import resolve_dtype
    monkeypatch.setenv("INFERLAB_ISA", "generic")
    kernels.native.cache_clear()
    try:
        assert resolve_dtype("auto", None, torch.device("cpu")) == torch.float32
        assert resolve_dtype("bfloat16", None, torch.device("cpu")) == torch.bfloat16
    finally:
        kernels.native.cache_clear()


def test_without_native_kernels_auto_is_fp32(monkeypatch):
    """PyTorch's ops alone: fp32 (HF's model exactly, and faster there) whatever the CPU has."""
    from inferlab.model.loader import resolve_dtype
    monkeypatch.setattr(kernels, "native", lambda: None)
    assert resolve_dtype("auto", None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", None, torch.device("cpu")) == torch.bfloat16


def test_disabled_kernels_fall_back_and_say_so(monkeypatch, caplog):
    monkeypatch.setenv("INFERLAB_NATIVE", "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert "INFERLAB_NATIVE=0" in caplog.text
        for off in ("false", "Off", "no"):  # the common spellings, which used to leave them on
            monkeypatch.setenv("INFERLAB_NATIVE", off)
            kernels.library.cache_clear()
            assert kernels.library() is None, off
        monkeypatch.setenv("INFERLAB_NATIVE", "nope")
        kernels.library.cache_clear()
        with pytest.raises(ValueError, match=r"^INFERLAB_NATIVE=nope: 0 \(off\) or 1 \(on\)$"):
            kernels.library()
    finally:
        kernels.library.cache_clear()


def test_build_failure_is_logged_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
        assert "native CPU kernels unavailable" in caplog.text
        assert "no C compiler: '/nonexistent/cc' is not there" in caplog.text  # what to install, not an errno
        monkeypatch.setenv("CC", "/nonexistent/ccache gcc")  # a command with its arguments, as make takes CC
        kernels.library.cache_clear()
        assert kernels.library() is None and "'/nonexistent/ccache' is not there" in caplog.text
    finally:
        kernels.library.cache_clear()


def test_a_kernel_source_error_fails_the_build_and_a_flag_the_compiler_lacks_leaves_its_isa_out(monkeypatch,
                                                                                                    tmp_path, caplog):
    """(A contributor's error in an ISA's file was logged as "this compiler cannot build them", and a library
    missing that ISA's functions, which others call, was linked and cached; it could not even load.)"""
    src = tmp_path / "src"
    for isa, code in (("generic", "int f_generic(void) { return 0; }"), ("good", "int f_good(void) { return 1; }"),
                      ("odd", "int f_odd(void) { return 2; }")):
        (src / isa).mkdir(parents=True)
        (src / isa / "a.c").write_text(code + "\n")
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builder, "ROOT", src)
    monkeypatch.setattr(builder, "compiled_isas", lambda: ["generic", "good", "odd"])
    monkeypatch.setattr(builder, "ISAS", {"generic": ([], ()), "good": ([], ()), "odd": (["-mno-such-isa-flag"], ())})
    lib = builder.build()  # a flag this compiler lacks: that ISA alone is left out, with a warning
    assert "native kernels for odd left out: this compiler cannot build them" in caplog.text
    assert "f_good" in subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    (src / "good" / "a.c").write_text("int f_good(void) { return oops; }\n")  # the source's own error
    with pytest.raises(subprocess.CalledProcessError) as e:
        builder.build()
    assert "oops" in builder.first_error(e.value)
    (src / "good" / "a.c").write_text("int f_missing(void);\nint f_good(void) { return f_missing(); }\n")
    with pytest.raises(subprocess.CalledProcessError) as e:  # a name no file defines: no library, none cached
        builder.build()
    assert "f_missing" in e.value.stderr
    assert not list((tmp_path / "cache" / "kernels").glob("inferlab_kernels-*.so"))[1:]  # only the first build's


def test_libraries_of_other_versions_unused_for_a_month_are_deleted(monkeypatch, tmp_path):
    current = builder.build()
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path))
    cache = tmp_path / "kernels"
    cache.mkdir()
    shutil.copy(current, cache / current.name)  # as built: a cache hit, no compiler run
    month, week = time.time() - 31 * 86400, time.time() - 7 * 86400
    os.utime(cache / current.name, (month, month))
    for name, when in (("inferlab_kernels-0000000000000000.so", month), ("inferlab_kernels-1111111111111111.so", week),
                       ("notes.so", month)):
        (cache / name).write_bytes(b"")
        os.utime(cache / name, (when, when))
    assert builder.build() == cache / current.name
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [current.name, "inferlab_kernels-1111111111111111.so", "notes.so"])  # a week: another install's
    assert time.time() - (cache / current.name).stat().st_mtime < 60  # loaded now: kept a month more


def test_a_cached_library_that_is_not_ours_is_not_used(monkeypatch, tmp_path, caplog):
    import subprocess
    (tmp_path / "other.c").write_text("int something_else(void) { return 1; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "other.c"), "-o", str(tmp_path / "other.so")], check=True)
    monkeypatch.setattr(kernels, "build", lambda: tmp_path / "other.so")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None  # it was an IndexError in native()
        assert f"{tmp_path / 'other.so'} is not an InferLab kernel library of this version, it lacks " \
               "cpu_features_generic (delete it" in caplog.text
    finally:
        kernels.library.cache_clear()


def test_an_unwritable_home_caches_in_the_temporary_directory(monkeypatch, tmp_path, caplog):
    """A container whose home is read-only or missing still gets its kernels built and cached."""
    from inferlab import cache_dir
    monkeypatch.delenv("INFERLAB_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/proc/no-such-home")
    monkeypatch.setattr(cache_dir.tempfile, "gettempdir", lambda: str(tmp_path))
    cache_dir._default_root.cache_clear()
    try:
        where = cache_dir.cache_dir("kernels")
        assert where.parent.parent == tmp_path and where.name == "kernels"
        assert "cannot use /proc/no-such-home/.cache/inferlab" in caplog.text
        assert (where.parent.stat().st_mode & 0o777) == 0o700  # the kernels there are loaded as code
        monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "chosen"))  # the user's folder wins
        assert cache_dir.cache_dir("models") == tmp_path / "chosen" / "models"
        monkeypatch.setenv("INFERLAB_CACHE", "")  # empty: as unset, not the current folder
        assert cache_dir.cache_dir("models") == where.parent / "models"
    finally:
        cache_dir._default_root.cache_clear()


def test_a_temporary_folder_others_can_write_is_never_the_cache(monkeypatch, tmp_path, caplog):
    """Another user who made /tmp/inferlab-<uid> first (or left it writable) could plant a kernel
    library there, loaded as this user's code; no home at all (a container's --user with no passwd
    entry) falls back too, instead of Path.home()'s RuntimeError."""
    from inferlab import cache_dir
    monkeypatch.delenv("INFERLAB_CACHE", raising=False)
    monkeypatch.setattr(cache_dir.tempfile, "gettempdir", lambda: str(tmp_path))

    def no_entry(uid: int) -> None:
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    planted = tmp_path / f"inferlab-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    cache_dir._default_root.cache_clear()
    try:
        where = cache_dir.cache_dir("kernels").parent
        assert where != planted and where.parent == tmp_path and (where.stat().st_mode & 0o777) == 0o700
        assert "cannot use ~/.cache/inferlab (Could not determine home directory.)" in caplog.text
    finally:
        cache_dir._default_root.cache_clear()


def test_backend_option_is_validated():
    from inferlab import EngineConfig
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_start_line_names_the_kernels_when_only_attention_is_pytorchs(smol, caplog):
    """`--attention-backend torch` moves attention alone to PyTorch; the start line said every op was
    PyTorch's while the native linears, norms and RoPE ran."""
    from inferlab import LLM
    if kernels.native() is None:
        pytest.skip("no native kernels here (see the log for why they did not build)")
    with caplog.at_level("INFO", logger="inferlab"):
        LLM(loaded=smol, num_kv_blocks=8, attention_backend="torch")
    assert re.search(rf"kernels: native {kernels.native().isa}( \(x16 blocks by \w+ products\))?, attention by "
                     "PyTorch; decode steps: op by op", caplog.text)
