"""The native paged-attention kernel against plain attention math, on random pools and tables."""
from __future__ import annotations

import pytest
import torch

from inferlab import kernels


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


@pytest.fixture(scope="module")
def lib():
    lib = kernels.native_library()
    if lib is None:
        pytest.skip("the native kernel did not build here (no C compiler?): the PyTorch path is used")
    return lib


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
# the last three: AMX row kernel shapes (block 32, one head per KV head) and one past its 16 heads
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 128, 1), (8, 2, 80, 7),
                                                                (16, 4, 64, 32), (12, 12, 64, 16), (32, 8, 64, 16)])
def test_kernel_matches_attention_math(lib, dtype, tol, heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks = 300 // block_size + 40
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    # three sequences: two decodes (one of a single key) and a prefill chunk of 5 rows over a prefix
    ctx = [1, 150, 97]
    width = max(-(-c // block_size) for c in ctx)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in ctx]).int()
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    seqs = torch.tensor([0, 1, 2, 2, 2, 2, 2], dtype=torch.int32)
    lens = torch.tensor([1, 150, 93, 94, 95, 96, 97], dtype=torch.int32)  # causal within the chunk
    q = torch.randn(8, heads, head_dim, generator=g).to(dtype)  # row 7 is not asked for
    scale = head_dim ** -0.5
    expected = _reference(q, k_cache, v_cache, rows, seqs, lens, tables, scale)
    for n in (7, 1):  # many rows: a task per row; one row: a task per (row, KV head)
        out = torch.full_like(q, 7.0)
        kernels.paged_attention_native(lib, q, k_cache, v_cache, out, rows[:n], seqs[:n], lens[:n], tables, scale)
        torch.testing.assert_close(out[:n].double(), expected[:n], atol=tol, rtol=tol)
        assert torch.all(out[n:] == 7.0), "rows not asked for must be left alone"


def test_kernel_refuses_mixed_dtypes(lib):
    q = torch.zeros(1, 2, 64)
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.paged_attention_native(lib, q, cache, cache, q.clone(), torch.zeros(1, dtype=torch.long),
                                       torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                       torch.zeros(1, 1, dtype=torch.int32), 0.125)


def test_backend_option_is_validated():
    from inferlab import EngineConfig
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_disabled_kernel_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERLAB_NATIVE", "0")
    kernels.native_library.cache_clear()
    try:
        assert kernels.native_library() is None
    finally:
        kernels.native_library.cache_clear()


def test_build_failure_is_logged_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    kernels.native_library.cache_clear()
    try:
        assert kernels.native_library() is None
        assert "native CPU kernels unavailable" in caplog.text
    finally:
        kernels.native_library.cache_clear()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_ops_match_their_reference(lib, dtype, tol):
    from inferlab import ops
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g).to(dtype)
    residual = torch.randn(37, 96, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    ref_out, ref_sum = ops.rms_norm_ref(x, weight, 1e-6, residual.clone())
    out, new_sum = ops.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(new_sum, ref_sum)  # the sum, exactly as the reference rounds it
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6)[0].float(), ops.rms_norm_ref(x, weight, 1e-6)[0].float(),
                               atol=tol, rtol=tol)

    gate_up = torch.randn(37, 2 * 80, generator=g).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up).float(), (torch.nn.functional.silu(gate) * up).float(),
                               atol=tol, rtol=tol)

    # rope on a strided view, as the model does on the fused qkv output: only the view changes
    qkv = torch.randn(37, 5 * 64, generator=g).to(dtype)
    before = qkv.clone()
    q = qkv[:, :3 * 64].view(37, 3, 64)
    freqs = torch.arange(37).float()[:, None] * (10000.0 ** (-torch.arange(32).float() / 32))
    expected = ops.rope_ref(q.clone(), freqs.cos(), freqs.sin())
    assert ops.rope(q, freqs.cos(), freqs.sin()).data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qkv[:, :3 * 64].view(37, 3, 64).float(), expected.float(), atol=tol, rtol=tol)
    assert torch.equal(qkv[:, 3 * 64:], before[:, 3 * 64:])


@pytest.mark.parametrize("rows", [5, 40])  # 40: split over threads
def test_write_kv_matches_index_copy(lib, rows):
    from inferlab.attention import write_kv
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(rows, 9 * 64 + 2 * 3 * 64, generator=g).to(torch.bfloat16)
    k = qkv[:, 9 * 64:12 * 64].view(rows, 3, 64)  # strided views, as the model passes them
    v = qkv[:, 12 * 64:].view(rows, 3, 64)
    slots = torch.cat([torch.tensor([7, 0, 33, 34, 12]), torch.randperm(64, generator=g)[:rows - 5] + 64])
    caches = [torch.zeros(8, 16, 3, 64, dtype=torch.bfloat16) for _ in range(4)]
    write_kv(caches[0], caches[1], k, v, slots, native=lib)
    write_kv(caches[2], caches[3], k, v, slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0].view(-1, 3, 64)[33], k[2])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 64, 65])  # 65: past the native kernel, PyTorch
@pytest.mark.parametrize("k,n", [(576, 96), (1536, 48), (100, 96), (576, 100)])  # 100s: tails AMX cannot tile
def test_decode_linear_matches_matmul(lib, rows, k, n):
    from inferlab import ops
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    expected = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(ops.linear(x, w, b).double(), expected, atol=0.3, rtol=2e-2)


def test_amx_linear_runs_where_the_cpu_has_it(lib):
    """On an AMX CPU the native path must really run (status 0) for tileable shapes, not fall back."""
    from pathlib import Path
    if "amx_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AMX")
    x, w = torch.randn(40, 576).bfloat16(), torch.randn(64, 576).bfloat16()
    y = torch.full((40, 64), 7.0, dtype=torch.bfloat16)
    assert lib.linear_bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), 40, 576, 64, 2) == 0
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=0.3, rtol=2e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 128, 32), (8, 2, 64, 16)])
def test_prefill_tile_kernel_matches_attention_math(lib, heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(head_dim + block_size)
    num_blocks = 200
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    # (queries, keys): fresh prompts of 37 and 5 tokens, chunks of 40, 16 and 1 over cached prefixes
    spec = [(37, 37), (5, 5), (40, 140), (16, 32), (1, 50)]
    width = max(-(-keys // block_size) for _, keys in spec)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in spec]).int()
    q = torch.randn(sum(n for n, _ in spec) + 3, heads, head_dim, generator=g).bfloat16()  # 3 rows not asked for
    row0, rows, seqs, lens = [], [], [], []
    for i, (n, keys) in enumerate(spec):
        row0.append(len(rows))
        rows += range(len(rows), len(rows) + n)
        seqs += [i] * n
        lens += range(keys - n + 1, keys + 1)  # causal: query t sees keys up to its own position
    out = torch.full_like(q, 7.0)
    ran = kernels.prefill_attention_native(
        lib, q, k_cache, v_cache, out, torch.tensor(row0), torch.tensor([n for n, _ in spec], dtype=torch.int32),
        torch.tensor([k for _, k in spec], dtype=torch.int32), torch.arange(len(spec), dtype=torch.int32), tables,
        head_dim ** -0.5)
    if not ran:
        pytest.skip("no AMX on this CPU: prefill chunks use SDPA")
    expected = _reference(q, k_cache, v_cache, torch.tensor(rows), torch.tensor(seqs), torch.tensor(lens), tables,
                          head_dim ** -0.5)
    n = len(rows)
    torch.testing.assert_close(out[:n].double(), expected[:n], atol=2e-2, rtol=2e-2)
    assert torch.all(out[n:] == 7.0), "rows not asked for must be left alone"


@pytest.mark.parametrize("cols", [49152, 37, 5])  # 37, 5: tails past the 16-wide vector loop
def test_bf16_argmax_matches_torch(lib, cols):
    from inferlab.sampler import argmax_rows
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(6, cols, generator=g).bfloat16()
    x[1] = -x[1].abs() - 1  # all negative: the order of negatives is flipped in the bit trick
    x[2] = float("-inf")
    x[2, cols // 2] = -3.0
    x[3] = 1.0  # all equal: the first index wins
    x[4, cols - 1] = 100.0  # the maximum in the tail
    x[5, :] = -0.5
    x[5, 2] = 0.0
    assert torch.equal(argmax_rows(x), x.float().argmax(-1))
