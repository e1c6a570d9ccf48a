"""Weight types: the kernels' dequantizer and quantizer against gguf's reference code, and the linear
kernel of every ISA, for every weight type, against a dequantized fp64 matmul — within the bound of
fp32 summation, since weight-only dequantization keeps the weights exact — and against itself: a row's
result does not depend on the batch it is in or the thread count."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inferlab import kernels
from inferlab.model.layers import quant, regroup, tiles
from inferlab.model.layers.keep import X16_DTYPES
from inferlab.model.layers.linear import int8_inputs, linear
from inferlab.model.layers.quant import INT8_TYPES


def random_weights(wtype: quant.WeightType, n: int, k: int, seed: int) -> torch.Tensor:
    return quant.random_stored(wtype, n, k, seed)


@pytest.mark.parametrize("wtype", quant.TYPES, ids=str)
def test_kernel_dequantizer_is_ggufs(wtype):
    k = 512
    w = random_weights(wtype, 7, k, seed=wtype.code)
    out = torch.empty(7, k)
    kernels.for_isa("generic").dequantize(out, w, wtype.code, 7, k)
    torch.testing.assert_close(out, quant.dequantize(w, wtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("wtype", [quant.Q8_0, quant.Q4_0, quant.Q4_1], ids=str)
def test_kernel_quantizer_writes_ggufs_bytes(wtype):
    from gguf import GGMLQuantizationType
    from gguf import quantize as gguf_quantize
    # a large matrix: a scale's last bit or a value on a rounding boundary goes wrong in only a few
    # blocks of a million values (as with -ffast-math's reciprocals)
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(3)) * 0.1
    x[0, :32] = 0  # an all-zero block: scale 0
    x[1, :32] = 5.0  # a constant block
    ours = quant.quantize(x, wtype)
    assert np.array_equal(ours.numpy(), gguf_quantize(x.numpy(), GGMLQuantizationType(wtype.code)))


@pytest.mark.parametrize("wtype", [quant.Q8_0, quant.Q4_0, quant.Q4_1], ids=str)
def test_a_nan_weight_quantizes_to_a_block_that_reads_nan_as_ggufs_does(wtype):
    """The native quantizer's largest |x| skipped a NaN, and the block read as if a 0 stood there: a
    model quantized at load (`--quantization q8_0`) hid a NaN weight that gguf's keeps. The bytes of
    such a block are not compared: gguf's NaN-to-integer casts are the platform's."""
    from gguf import GGMLQuantizationType
    from gguf import quantize as gguf_quantize
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    x[1, 37], x[3, 0] = float("nan"), float("inf")
    with np.errstate(invalid="ignore"):  # gguf's numpy code warns of the NaNs it carries
        theirs = quant.dequantize(torch.from_numpy(gguf_quantize(x.numpy(), GGMLQuantizationType(wtype.code))), wtype)
        ours = quant.dequantize(quant.quantize(x, wtype), wtype)
    assert ours[1, 32:64].isnan().all() and theirs[1, 32:64].isnan().all()
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What fp32 summation of K products may lose: K * 2^-24 * sum |x w| (plus output rounding)."""
    k = x.shape[1]
    return (x.abs().double() @ w.abs().double().T) * k * 2.0 ** -24 + 1e-6


@pytest.mark.parametrize("wtype", quant.TYPES, ids=str)
def test_linear_matches_dequantized_matmul(isa, wtype, monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    k, n = (512, 37) if wtype.block < 256 else (512, 29)
    w = random_weights(wtype, n, k, seed=wtype.code + 1)
    dense = quant.dequantize(w, wtype).double()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(70, k, generator=g)
    bias = torch.randn(n, generator=g)
    want = x.double() @ dense.T + bias.double()
    for rows in (1, 2, 5, 13, 70):
        got = linear(x[:rows], w, wtype, bias)
        assert (got.double() - want[:rows]).abs().le(_bound(x[:rows], dense.float())).all(), (rows, isa)
    # bf16 activations: widened to fp32 on the way in, the output rounded once
    xb = x.bfloat16()
    want = xb.double() @ dense.T + bias.bfloat16().double()
    got = linear(xb, w, wtype, bias.bfloat16())
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("wtype", [quant.Q8_0, quant.Q4_1, quant.Q5_0], ids=str)
def test_every_fp16_scale_reaches_the_products_exactly(isa, wtype, monkeypatch):
    """Scales are read through a table of every fp16 value on some ISAs: each finite one, subnormals
    and signed zeros included, must multiply as its exact fp32 value. One block a row, scale h_n, a
    single weight of one (Q4_1: also rows of scale 0 whose minimum is h_n), one input of one."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[halves.isfinite()]
    bits = halves.view(torch.int16).view(torch.uint8).view(-1, 2)
    n = len(halves)
    blocks = torch.zeros(n, wtype.nbytes, dtype=torch.uint8)
    blocks[:, :2] = bits  # d, the first two bytes of each of these formats
    blocks[:, {quant.Q8_0: 2, quant.Q4_1: 4, quant.Q5_0: 6}[wtype]] = 1  # weight 0's byte (low nibble)
    if wtype is quant.Q5_0:
        blocks[:, 2] = 1  # and its fifth bit: (17 - 16) d
    want = halves.float()
    if wtype is quant.Q4_1:
        mins = torch.zeros(n, wtype.nbytes, dtype=torch.uint8)
        mins[:, 2:4] = bits  # m = h_n, d = 0: every weight is h_n
        blocks, want = torch.cat([blocks, mins]), torch.cat([want, want])
    x = torch.zeros(1, 32)
    x[0, 0] = 1
    got = linear(x, blocks, wtype)[0]
    assert torch.equal(got, want), (got - want).abs().argmax()


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("wtype", [quant.F32, quant.BF16, quant.Q8_0, quant.Q4_0, quant.Q4_1, quant.Q6_K, quant.Q3_K,
                                   quant.Q2_K, quant.IQ4_XS, quant.IQ4_NL, quant.Q5_0, quant.Q5_K, quant.Q4_K], ids=str)
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads(isa, wtype, int8, monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    w = random_weights(wtype, 50, 256, seed=7)
    x = torch.randn(67, 256, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([linear(x[i:i + 1], w, wtype, int8=int8) for i in range(0, 67, 11)])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.equal(linear(x, w, wtype, int8=int8)[::11], alone), threads
        assert torch.equal(linear(x[3:9], w, wtype, int8=int8)[0], linear(x[3:4], w, wtype, int8=int8)[0])
    torch.set_num_threads(2)


@pytest.mark.parametrize("wtype", [quant.BF16, quant.F16, quant.Q4_1, quant.Q6_K], ids=str)
def test_avx512_builds_multiply_what_they_hand_to_avx2s_paths_as_avx2_does(isa, wtype):
    """The AVX-512 builds run AVX2's paths for what their own tiles do not take (bf16 or f16 weights
    against fp32 inputs, block types outside the regrouped kernel's shapes), their panels twice as
    wide (avx512/pairs.h): every output is the AVX2 build's, bit for bit, at every row count, a
    K with a tail past the last 8 included."""
    if not isa.startswith("avx512"):
        pytest.skip("the AVX-512 builds' float paths")
    if "avx2" not in (kernels.library() or (None, []))[1]:
        pytest.skip("this CPU cannot run the avx2 kernels")
    for k, n in ((512, 50), (100, 37)) if wtype.dtype is not None else ((512, 50),):
        w = random_weights(wtype, n, k, seed=wtype.code + 5)
        x, bias = torch.randn(70, k, generator=torch.Generator().manual_seed(6)), torch.randn(n)
        want = _kernel_linear("avx2", x, w, wtype, bias)
        for rows in (1, 2, 3, 5, 8, 9, 33, 70):
            assert torch.equal(_kernel_linear(isa, x[:rows], w, wtype, bias), want[:rows]), (k, rows)


def _kernel_linear(isa: str, x: torch.Tensor, w: torch.Tensor, wtype: quant.WeightType, bias: torch.Tensor,
                   act: str = "IL_ACT_FLOAT"):
    """fp32 x @ W^T + bias by the `isa` build's linear layer itself (`act`: its activations' constant)."""
    (rows, k), n = x.shape, bias.shape[0]
    y = torch.empty(rows, n)
    f32 = kernels.DTYPE_CODES[torch.float32]
    kernels.for_isa(isa).linear(x, k, w, wtype.code, bias, y, n, rows, k, n, f32, f32, kernels.C[act])
    return y


@pytest.mark.parametrize("wtype", INT8_TYPES, ids=str)
def test_avx512_builds_int8_products_are_avx2s(isa, wtype):
    """Every AVX-512 build's int8 path (avx512/int8_quads.h: four weight rows a register, by VNNI's
    byte dot products, or on avx512f by AVX2's multiply-adds at twice the width) sums each block in
    the lanes AVX2's does and finishes it with the same fp32 operations: AVX2's results bit for bit,
    at every row count."""
    if not isa.startswith("avx512"):
        pytest.skip("the AVX-512 builds' int8 path")
    if "avx2" not in (kernels.library() or (None, []))[1]:
        pytest.skip("this CPU cannot run the avx2 kernels")
    w = random_weights(wtype, 48, 512, seed=wtype.code + 9)
    x, bias = torch.randn(70, 512, generator=torch.Generator().manual_seed(7)) * 3, torch.randn(48)
    want = _kernel_linear("avx2", x, w, wtype, bias, "IL_ACT_INT8")
    for rows in (1, 2, 3, 4, 5, 9, 33, 70):
        assert torch.equal(_kernel_linear(isa, x[:rows], w, wtype, bias, "IL_ACT_INT8"), want[:rows]), rows


@pytest.mark.parametrize("wtype", INT8_TYPES, ids=str)
def test_amx_int8_tiles_give_avx2s_int8_products(wtype):
    """From 16 rows the AMX build multiplies Q8_0, Q4_0 and Q4_1 blocks with int8 activations on its
    integer tiles (amx/int8.c), each block's four lane sums the AVX2 kernel keeps finished with its
    fp32 operations: AVX2's results bit for bit at every row count, bf16 inputs and outputs too.
    Other types, and an N that is not a multiple of 16, go to the AVX-512 kernel."""
    if "amx" not in (kernels.library() or (None, []))[1]:
        pytest.skip("this CPU cannot run the amx kernels")
    for k, n in ((512, 48), (max(64, wtype.block), 16), (512, 37)):  # 64: two 32-weight blocks
        w = random_weights(wtype, n, k, seed=wtype.code + n)
        x, bias = torch.randn(70, k, generator=torch.Generator().manual_seed(k)) * 3, torch.randn(n)
        want = _kernel_linear("avx2", x, w, wtype, bias, "IL_ACT_INT8")
        for rows in (1, 15, 16, 17, 33, 70):
            got = _kernel_linear("amx", x[:rows], w, wtype, bias, "IL_ACT_INT8")
            assert torch.equal(got, want[:rows]), (k, n, rows)
        if n % 16:
            continue  # the bf16 call below on the shapes the tiles take
        bf16 = kernels.DTYPE_CODES[torch.bfloat16]
        xb, bb = x.bfloat16(), bias.bfloat16()
        ys = {isa: torch.empty(70, n, dtype=torch.bfloat16) for isa in ("avx2", "amx")}
        for isa, y in ys.items():
            kernels.for_isa(isa).linear(xb, k, w, wtype.code, bb, y, n, 70, k, n, bf16, bf16, kernels.C["IL_ACT_INT8"])
        assert torch.equal(ys["amx"], ys["avx2"])


@pytest.mark.parametrize("wtype", [quant.Q8_0, quant.Q6_K, quant.Q4_1X16, quant.BF16, quant.F32], ids=str)
def test_avx512vnni_hands_all_but_the_int8_path_to_avx512f(wtype):
    """The avx512vnni build (Cascade Lake, Ice Lake-SP: AVX512-VNNI without AVX512-BF16) has its own
    int8 path only: every other call is avx512f's layer's, bit for bit, at every row count."""
    if "avx512vnni" not in (kernels.library() or (None, []))[1]:
        pytest.skip("this CPU cannot run the avx512vnni kernels")
    base = wtype.base or wtype
    w = random_weights(base, 48, 512, seed=base.code + 9)
    w = regroup.repack(w, base) if wtype.base is not None else w
    x, bias = torch.randn(70, 512, generator=torch.Generator().manual_seed(7)), torch.randn(48)
    for rows in (1, 2, 3, 5, 33, 70):
        got = _kernel_linear("avx512vnni", x[:rows], w, wtype, bias)
        assert torch.equal(got, _kernel_linear("avx512f", x[:rows], w, wtype, bias)), rows


@pytest.mark.parametrize("wtype", [quant.BF16, quant.Q8_0, quant.Q4_1], ids=str)
def test_a_bf16_rows_result_does_not_depend_on_its_batch(isa, wtype, monkeypatch):
    """Up to a decode step's rows (the tape's limit), bf16 activations too: a few-row and a many-row
    call (AVX512-BF16: tiles of 1 x 16 up to 4 x 4) sum each output in one order."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    w = random_weights(wtype, 50, 288, seed=9)  # 288: a masked tail past the last 32 pairs
    g = torch.Generator().manual_seed(10)
    x = torch.randn(kernels.C["IL_MAX_ROWS"], 288, generator=g).bfloat16()
    bias = torch.randn(50, generator=g).bfloat16()
    batch = linear(x, w, wtype, bias)
    for rows in (1, 2, 3, 4, 7):
        assert torch.equal(linear(x[:rows], w, wtype, bias), batch[:rows]), rows
    assert torch.equal(linear(x[5:6], w, wtype, bias)[0], batch[5])
    want = x.double() @ quant.dequantize(w, wtype).double().T + bias.double()
    torch.testing.assert_close(batch.double(), want, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("long_k", [False, True], ids=["k", "long_k"])
@pytest.mark.parametrize("wtype", [quant.BF16, quant.Q8_0, quant.Q4_1, quant.Q4_K], ids=str)
def test_amx_gives_a_row_the_same_bits_in_prefill_chunks_too(isa, wtype, long_k, monkeypatch):
    """On AMX the tiles run bf16 matmuls at every row count, prefill chunks as well as decode steps (past
    64 rows with x and W's roles swapped, amx/rows.c), each output one chain of tile products over K: a
    row's bits are the same alone, in a decode step and in any chunk, so a prompt prefilled whole
    answers as when chunked, read from the prefix cache or batched with another request's prefill.
    Past 768 inputs (`long_k`) rows.c sums K in pieces, its accumulators stored between them."""
    if isa != "amx":
        pytest.skip(f"only the AMX tiles run bf16 matmuls past a decode step's rows ({isa}: PyTorch's oneDNN)")
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    limit, k = 700, 1536 if long_k else 512 if wtype.block == 256 else 320
    w = random_weights(wtype, 48, k, seed=wtype.code + 21)
    dense = quant.dequantize(w, wtype).bfloat16().double()
    if wtype != quant.BF16:
        w, wtype = tiles.repack(w, wtype), quant.TILED[wtype]
    g = torch.Generator().manual_seed(22)
    x, bias = torch.randn(limit, k, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
    for out in (None, torch.float32):
        whole = linear(x, w, wtype, bias, out_dtype=out)
        for rows in (1, 5, 64, 65, 200, 257, 600):  # rows.c: tiles of 16, blocks of 32, rows split from 256
            parts = torch.cat([linear(x[i:i + rows], w, wtype, bias, out_dtype=out) for i in range(0, limit, rows)])
            assert torch.equal(parts, whole), (rows, out)
    wide = torch.zeros(limit, 80, dtype=torch.bfloat16)  # into a column slice: y's rows 80 apart
    linear(x, w, wtype, bias, out=wide[:, 16:64])
    assert torch.equal(wide[:, 16:64], linear(x, w, wtype, bias)) and not wide[:, :16].any() and not wide[:, 64:].any()
    want = x.double() @ dense.T + bias.double()
    torch.testing.assert_close(whole.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("wtype", [quant.BF16, quant.Q8_0, quant.Q4_1], ids=str)
def test_fp32_output_of_bf16_inputs_is_not_rounded(isa, wtype, monkeypatch):
    """A bf16 model's logits: fp32 out keeps the sums as they are, within fp32 summation of the
    exact products of the bf16 inputs (a bf16 out would round them to 8 bits). 48 outputs: whole
    16-column blocks, the shape AMX tiles take."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    x = torch.randn(kernels.C["IL_MAX_ROWS"], 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    for n in (37, 48):
        w = random_weights(wtype, n, 512, seed=wtype.code + n)
        dense = quant.dequantize(w, wtype).double()
        for rows in (1, 5, 64):
            got = linear(x[:rows], w, wtype, out_dtype=torch.float32)
            assert got.dtype == torch.float32
            want = x[:rows].double() @ dense.T
            assert (got.double() - want).abs().le(_bound(x[:rows].float(), dense.float())).all(), (n, rows)


@pytest.mark.parametrize("wtype", INT8_TYPES, ids=str)
def test_int8_activations_multiply_the_quantized_inputs_exactly(isa, wtype, monkeypatch):
    """The int8 path's result is the product of the int8-rounded inputs with the stored weights, up
    to fp32 summation: block products are exact in integers."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    w = random_weights(wtype, 37, 512, seed=wtype.code)
    dense = quant.dequantize(w, wtype).double()
    g = torch.Generator().manual_seed(4)
    x, bias = torch.randn(9, 512, generator=g), torch.randn(37, generator=g)
    xq = int8_inputs(x).double()
    want = xq @ dense.T + bias.double()
    for rows in (1, 2, 9):
        got = linear(x[:rows], w, wtype, bias, int8=True)
        assert (got.double() - want[:rows]).abs().le(_bound(xq[:rows].float(), dense.float()) * 4).all(), rows
    assert not torch.equal(linear(x, w, wtype, bias, int8=True), linear(x, w, wtype, bias))  # it did quantize


def test_linear_writes_into_a_column_slice(isa, monkeypatch):
    """Merged layers of mixed types write each part into its columns of one output."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    w = random_weights(quant.Q8_0, 8, 64, seed=1)
    x = torch.randn(3, 64)
    y = torch.full((3, 20), 7.0)
    linear(x, w, quant.Q8_0, out=y[:, 5:13])
    assert torch.equal(y[:, 5:13], linear(x, w, quant.Q8_0))
    assert (y[:, :5] == 7).all() and (y[:, 13:] == 7).all()


def regrouped(w: torch.Tensor, wtype: quant.WeightType) -> torch.Tensor:
    """GGUF rows w as the regrouped type wtype (x16 or t16)."""
    return (tiles.repack if wtype in quant.TILED.values() else regroup.repack)(w, wtype.base)


@pytest.mark.parametrize("wtype", [*quant.TYPES, *quant.REGROUPED.values(), quant.BF16X16, *quant.TILED.values()],
                         ids=str)
def test_embedding_lookup_matches_dequantized_rows(isa, wtype):
    """Every build looks rows up in every type, the regrouped ones (a tied LM head's) included, and
    into bf16 rounds each value once (the AMX build's t16 decoding too: whole groups and single rows)."""
    w = random_weights(wtype.base or wtype, 48, 256, seed=3)
    w = regrouped(w, wtype) if wtype.base else w
    ids = torch.tensor([39, 0, 7, 7, 21])
    out = torch.empty(5, 256)
    kernels.for_isa(isa).get_rows(out, w, wtype.code, ids, 5, 256, kernels.DTYPE_CODES[torch.float32])
    torch.testing.assert_close(out, quant.dequantize(w, wtype)[ids], rtol=1e-6, atol=0)
    for rows in (ids, torch.arange(48), torch.cat([torch.arange(16, 32), torch.arange(5)])):
        out = torch.empty(len(rows), 256, dtype=torch.bfloat16)
        kernels.for_isa(isa).get_rows(out, w, wtype.code, rows, len(rows), 256, kernels.DTYPE_CODES[torch.bfloat16])
        assert torch.equal(out, quant.dequantize(w, wtype)[rows].bfloat16())


@pytest.mark.parametrize("wtype", list(quant.REGROUPED), ids=str)
def test_regrouping_moves_the_blocks_and_nothing_else(wtype):
    w = random_weights(wtype, 48, 320 if wtype.block == 32 else 512, seed=5)  # whole blocks of 32 or 256
    regrouped = regroup.repack(w, wtype)
    assert regrouped.shape == w.shape and not torch.equal(regrouped, w)
    assert torch.equal(regroup.unrepack(regrouped, quant.REGROUPED[wtype]), w)
    assert torch.equal(quant.dequantize(regrouped, quant.REGROUPED[wtype]), quant.dequantize(w, wtype))
    with pytest.raises(ValueError, match="do not split into groups of 16"):
        regroup.repack(w[:40], wtype)


def test_bf16_pair_rows_move_the_weights_and_nothing_else():
    """bf16 weights [N, K] regrouped (BF16X16) are their bytes [N, 2 K] moved: pair row p of a group's
    32-input block holds its 16 rows' inputs 2 p, 2 p + 1 side by side."""
    w = random_weights(quant.BF16, 48, 320, seed=5)
    pairs = regroup.repack(w, quant.BF16)
    assert pairs.dtype == torch.uint8 and pairs.shape == (48, 640)
    group = pairs[16:32].reshape(-1).view(torch.bfloat16).reshape(10, 16, 32)  # [block, pair row, lane]
    assert torch.equal(group[3, 1, 2:4], w[16 + 1, 32 * 3 + 2:32 * 3 + 4])  # block 3, pair row 1, row 1
    assert torch.equal(regroup.unrepack(pairs, quant.BF16X16), w)
    assert torch.equal(quant.dequantize(pairs, quant.BF16X16), w.float())
    with pytest.raises(ValueError, match="do not split into groups of 16"):
        regroup.repack(w[:40], quant.BF16)


@pytest.mark.parametrize("wtype", list(quant.TILED), ids=str)
def test_tiled_regrouping_moves_the_blocks_and_nothing_else(wtype):
    w = random_weights(wtype, 48, 512 if wtype.block == 256 else 320, seed=6)
    tiled = tiles.repack(w, wtype)
    assert tiled.shape == w.shape and not torch.equal(tiled, w) and not torch.equal(tiled, regroup.repack(w, wtype))
    assert torch.equal(tiles.unrepack(tiled, quant.TILED[wtype]), w)
    assert torch.equal(quant.dequantize(tiled, quant.TILED[wtype]), quant.dequantize(w, wtype).bfloat16().float())
    with pytest.raises(ValueError, match="do not split into groups of 16"):
        tiles.repack(w[:40], wtype)
    tiled_names = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_K, q3_K, q4_K, q5_K, q6_K, iq4_nl, iq4_xs"
    with pytest.raises(ValueError, match=f"only {tiled_names} regroup for the tiles, not bf16"):
        tiles.repack(torch.zeros(16, 64, dtype=torch.bfloat16), quant.BF16)


@pytest.mark.parametrize("wtype", list(quant.TILED), ids=str)
def test_tiled_blocks_give_the_bf16_weights_products(isa, wtype, monkeypatch):
    """A t16 matrix is the bf16 weights its blocks round to, kept in a quarter of the bytes: on AMX the
    tiles decode it and give the very bits of those bf16 weights' product at every row count (decode
    steps and prefill chunks), thread count and output dtype; on other ISAs PyTorch multiplies the
    bf16 weights the kernels decode it to."""
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    from inferlab.model.layers.linear import linear_ref, tiles_to_bf16
    k = 512 if wtype.block == 256 else 320
    w = random_weights(wtype, 64, k, seed=wtype.code + 9)
    t16, dense = quant.TILED[wtype], quant.dequantize(w, wtype)
    tiled = tiles.repack(w, wtype)
    weights = tiles_to_bf16(tiled, t16)
    assert torch.equal(weights, dense.bfloat16())
    g = torch.Generator().manual_seed(17)
    x, bias = torch.randn(80, k, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    for rows in (1, 2, 5, 16, 33, 64, 80):
        for b, out in ((bias, None), (None, torch.float32)):
            got = linear(x[:rows], tiled, t16, b, out_dtype=out)
            want = (linear(x[:rows], weights, quant.BF16, b, out_dtype=out) if isa == "amx"
                    else linear_ref(x[:rows], weights, quant.BF16, b, out_dtype=out))
            assert torch.equal(got, want), (rows, out)
    torch.set_num_threads(1)
    try:
        assert torch.equal(linear(x[:3], tiled, t16, bias), linear(x, tiled, t16, bias)[:3]) if isa == "amx" else True
    finally:
        torch.set_num_threads(2)
    if isa == "amx":  # where the tiles do not run (a strided x, past 64 rows): the bf16 weights, by AVX-512
        wide = torch.randn(80, k + 80, generator=g).bfloat16()
        for rows in (1, 5, 80):
            y, want = (torch.empty(rows, 64, dtype=torch.bfloat16) for _ in range(2))
            x_cols, shape = wide[:rows, 40:40 + k], (rows, k, 64, 1, 1, 0)
            kernels.for_isa("amx").linear(x_cols, k + 80, tiled, t16.code, None, y, 64, *shape)
            kernels.for_isa("avx512").linear(x_cols, k + 80, weights, quant.BF16.code, None, want, 64, *shape)
            assert torch.equal(y, want), rows


def test_a_merged_layer_of_tiled_parts_multiplies_as_its_joined_bf16_matrix():
    """A merged q/k/v of Q5_0 and Q8_0 shards keeps one t16 part per type on AMX; past a decode step's
    rows the parts' bf16 weights go through one product, as `quantization="none"`'s joined bf16 matrix
    does (oneDNN's sums can change with a matrix's width), so the bits are the same at every row count."""
    native = kernels.native()
    if native is None or native.isa != "amx":
        pytest.skip(f"the t16 blocks are AMX's (kernels here: {native and native.isa})")
    from inferlab.model.layers.linear import Linear
    shards = [(random_weights(quant.Q5_0, 768, 576, seed=1), quant.Q5_0), (random_weights(quant.Q8_0, 192, 576, seed=2),
                                                                           quant.Q8_0)]

    def layer(mode: str) -> Linear:
        lin = Linear(576, [768, 192])
        for i, (w, t) in enumerate(shards):
            lin.weight_loader(lin.weight, w, shard=i, wtype=t)
        lin.process_weights_after_loading(mode, torch.bfloat16, "amx")
        return lin
    tiled, dense = layer("auto"), layer("none")
    assert [tiled.wtype, tiled.parts[0][1]] == [quant.Q5_0T16, quant.Q8_0T16] and not dense.parts
    g = torch.Generator().manual_seed(3)
    for rows in (1, 64, 65, 210, 300):
        x = torch.randn(rows, 576, generator=g).bfloat16()
        assert torch.equal(tiled(x), dense(x)), rows


@pytest.fixture(params=list(kernels.X16_PRODUCTS))
def x16_products(request):
    """Each of the regrouped kernel's products in turn (bf16 pairs, fp32 FMAs), the start-up choice restored."""
    native = kernels.native()
    before = native and native.products()
    if before is None and request.param != "bf16":
        pytest.skip(f"no regrouped kernel here to choose products for (kernels: {native and native.isa})")
    if before is not None:
        native.products(request.param)
    yield request.param
    if before is not None:
        native.products(before)


@pytest.mark.parametrize("wtype", [*quant.REGROUPED, quant.BF16], ids=str)
def test_regrouped_linear_is_exact_and_batch_invariant(isa, wtype, x16_products, monkeypatch):
    """bf16 inputs against the regrouped blocks (and bf16 weights in their pair rows, BF16X16): the
    exact products of the dequantized weights within fp32 summation (AVX512-BF16 kernel, with either
    products; PyTorch on ISAs without it), and with the kernel each row's result the same alone, in any
    batch (few-row groups, the one-row path's 2 or 4 blocks side by side, many-row tiles, past a decode
    step's 64 rows too) and with any thread count. (PyTorch's fp32 matmul sums in an order that depends
    on the row count, so its bf16 rounding may too; the engine keeps the regrouped types to the ISAs
    with the kernel.)"""
    if kernels.for_isa(isa).products() not in (None, x16_products):
        pytest.skip(f"the {isa} build has only {kernels.for_isa(isa).products()} products")
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    k = 352 if wtype.block == 32 else 512  # 11 blocks a row: one row runs 2 or 4 at a time, then the rest
    w = random_weights(wtype, 128, k, seed=wtype.code + 7)
    rt, dense = quant.REGROUPED.get(wtype, quant.BF16X16), quant.dequantize(w, wtype).double()
    w = regroup.repack(w, wtype)
    g = torch.Generator().manual_seed(13)
    x, bias = torch.randn(70, k, generator=g).bfloat16(), torch.randn(128, generator=g).bfloat16()
    want = x.double() @ dense.T
    got = linear(x, w, rt, out_dtype=torch.float32)
    assert (got.double() - want).abs().le(_bound(x.float(), dense.float())).all(), isa
    batch = linear(x, w, rt, bias)
    torch.testing.assert_close(batch.double(), want + bias.double(), rtol=8e-3, atol=1e-2)
    if isa not in X16_DTYPES:
        return
    for rows in (1, 2, 3, 5, 33, 64):  # the fp32 outputs, where rounding to bf16 would hide a changed order of sums
        assert torch.equal(linear(x[:rows], w, rt, out_dtype=torch.float32), got[:rows]), rows
        assert torch.equal(linear(x[:rows], w, rt, bias), batch[:rows]), rows
    assert torch.equal(linear(x, w[:48], rt, out_dtype=torch.float32), got[:, :48])  # 3 groups: the few-row path
    torch.set_num_threads(1)
    try:
        assert torch.equal(linear(x[5:6], w, rt, out_dtype=torch.float32)[0], got[5])
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("wtype", list(quant.REGROUPED), ids=str)
def test_regrouped_blocks_take_fp32_inputs(isa, wtype, x16_products, monkeypatch):
    """The AVX-512 builds multiply the regrouped blocks by fp32 FMAs of fp32 inputs (avx512f: those
    CPUs' only activations; avx512 and amx: a model run in fp32), whichever products bf16 inputs get:
    the dequantized matmul within fp32 summation, an fp32 bias added, and each row's result the same
    alone, in any batch and with any thread count."""
    from inferlab.model.layers import linear as linear_module
    if torch.float32 not in X16_DTYPES.get(isa, ()):
        with pytest.raises(RuntimeError, match="status 1"):  # the kernels refuse them: `linear` keeps them away
            w = regroup.repack(random_weights(wtype, 16, 512, seed=1), wtype)
            kernels.for_isa(isa).linear(torch.randn(1, 512), 512, w, quant.REGROUPED[wtype].code, None,
                                        torch.empty(1, 16), 16, 1, 512, 16, 0, 0, 0)
        return
    monkeypatch.setattr(kernels, "native", lambda: kernels.for_isa(isa))
    monkeypatch.setattr(linear_module, "linear_ref", lambda *a, **k: pytest.fail("ran PyTorch's matmul"))
    k = 352 if wtype.block == 32 else 512
    w = random_weights(wtype, 128, k, seed=wtype.code + 11)
    rt, dense = quant.REGROUPED[wtype], quant.dequantize(w, wtype).double()
    w = regroup.repack(w, wtype)
    g = torch.Generator().manual_seed(17)
    x, bias = torch.randn(70, k, generator=g), torch.randn(128, generator=g)
    got = linear(x, w, rt, bias)
    assert got.dtype == torch.float32
    assert (got.double() - (x.double() @ dense.T + bias.double())).abs().le(_bound(x, dense.float())).all()
    for rows in (1, 2, 3, 5, 33, 64):
        assert torch.equal(linear(x[:rows], w, rt, bias), got[:rows]), rows
    assert torch.equal(linear(x, w[:48], rt, bias[:48]), got[:, :48])  # 3 groups: the few-row path at any rows
    torch.set_num_threads(1)
    try:
        assert torch.equal(linear(x[5:6], w, rt, bias)[0], got[5])
    finally:
        torch.set_num_threads(2)


def test_bf16_weights_past_a_decode_step_take_the_fp32_tiles_where_chosen(x16_products, monkeypatch):
    """Past 64 rows a bf16 x bf16 matmul goes to PyTorch (oneDNN), but where the AVX-512 kernels take fp32
    products (Intel's cores without AMX) to their widened tiles: exact products summed in fp32, a row's
    result the same in any batch past 64 rows, the bias added; shapes the tiles do not take go on as before."""
    from inferlab.model.layers import linear as linear_module
    native = kernels.native()
    tiles = native is not None and native.isa == "avx512" and x16_products == "fp32"
    if tiles:  # no fallback to PyTorch may hide the kernel
        monkeypatch.setattr(linear_module, "linear_ref", lambda *a, **k: pytest.fail("ran PyTorch's matmul"))
    g = torch.Generator().manual_seed(21)
    w, x = (torch.randn(192, 352, generator=g) * 0.05).bfloat16(), torch.randn(150, 352, generator=g).bfloat16()
    bias = torch.randn(192, generator=g).bfloat16()
    want = x.double() @ w.double().T
    got = linear(x, w, quant.BF16, out_dtype=torch.float32)
    assert (got.double() - want).abs().le(_bound(x.float(), w.float())).all()
    torch.testing.assert_close(linear(x, w, quant.BF16, bias).double(), want + bias.double(), rtol=8e-3, atol=1e-2)
    if tiles:
        for rows in (65, 70, 131):
            assert torch.equal(linear(x[:rows], w, quant.BF16, out_dtype=torch.float32), got[:rows]), rows
        odd = w[:80]  # 80 outputs: not whole 64s, so the pair tiles run it
        odd_got = linear(x, odd, quant.BF16, out_dtype=torch.float32).double()
        assert (odd_got - want[:, :80]).abs().le(_bound(x.float(), odd.float())).all()


def test_x16_products_are_chosen_by_the_cpu_or_the_environment(monkeypatch):
    """FMAs where a bf16 pair product issues at a quarter of their rate (Intel), pairs elsewhere; the
    variable overrides, and a wrong value is a one-line error naming it."""
    monkeypatch.delenv("INFERLAB_X16_PRODUCTS", raising=False)
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "GenuineIntel")
    assert kernels.x16_products() == "fp32"
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert kernels.x16_products() == "bf16"
    monkeypatch.setenv("INFERLAB_X16_PRODUCTS", "fp32")
    assert kernels.x16_products() == "fp32"
    monkeypatch.setenv("INFERLAB_X16_PRODUCTS", " FP32")  # read as INFERLAB_ISA is (it was refused)
    assert kernels.x16_products() == "fp32"
    monkeypatch.setenv("INFERLAB_X16_PRODUCTS", "int4")
    with pytest.raises(ValueError, match="INFERLAB_X16_PRODUCTS=int4: one of bf16, fp32"):
        kernels.x16_products()


def test_regrouped_types_run_only_where_their_kernel_is(isa):
    """Other builds refuse the regrouped types rather than misread them (`linear` keeps them away)."""
    w = regroup.repack(random_weights(quant.Q4_1, 16, 64, seed=2), quant.Q4_1)
    x, y = torch.randn(2, 64).bfloat16(), torch.empty(2, 16, dtype=torch.bfloat16)
    args = (x, 64, w, quant.Q4_1X16.code, None, y, 16, 2, 64, 16, 1, 1, 0)
    if isa not in X16_DTYPES:
        with pytest.raises(RuntimeError, match="status 1"):
            kernels.for_isa(isa).linear(*args)
    else:
        kernels.for_isa(isa).linear(*args)
        torch.testing.assert_close(y.float(), x.float() @ quant.dequantize(w, quant.Q4_1X16).T, rtol=8e-3, atol=1e-2)
    w = tiles.repack(random_weights(quant.Q4_1, 16, 64, seed=2), quant.Q4_1)
    args = (x, 64, w, quant.Q4_1T16.code, None, y, 16, 2, 64, 16, 1, 1, 0)
    if isa != "amx":
        with pytest.raises(RuntimeError, match="status 1"):
            kernels.for_isa(isa).linear(*args)
    else:
        kernels.for_isa(isa).linear(*args)
        weights = quant.dequantize(w, quant.Q4_1T16)  # the bf16 weights it stands for
        torch.testing.assert_close(y.float(), x.float() @ weights.T, rtol=8e-3, atol=1e-2)


def test_quantizing_a_type_it_cannot_write_is_refused():
    with pytest.raises(ValueError, match="cannot quantize to q6_K"):
        quant.quantize(torch.zeros(2, 256), quant.Q6_K)
    with pytest.raises(ValueError, match="do not split into q8_0 blocks"):
        quant.quantize(torch.zeros(2, 48), quant.Q8_0)


def test_what_each_quantization_mode_keeps():
    from inferlab.model.layers.keep import target_type
    f32, bf16 = torch.float32, torch.bfloat16
    assert target_type(quant.Q4_1, 576, "auto", f32, "avx2") == quant.Q4_1  # as stored
    assert target_type(quant.BF16, 576, "auto", f32, "avx2") == quant.BF16  # a bf16 checkpoint stays bf16
    assert target_type(quant.Q4_1, 576, "auto", f32, None) == quant.F32  # no kernels: the model's dtype
    assert target_type(quant.Q4_1, 576, "auto", bf16, "amx") == quant.BF16  # bf16 matrix units beat decoding
    assert target_type(quant.Q4_1, 576, "auto", f32, "amx") == quant.Q4_1
    # wider float weights in a bf16 model on bf16 matrix units: bf16, as a prefill multiplies them
    assert target_type(quant.F32, 576, "auto", bf16, "amx", rows=576) == quant.BF16
    assert target_type(quant.F16, 576, "auto", bf16, "avx512") == quant.BF16
    assert target_type(quant.F32, 576, "auto", f32, "amx") == quant.F32  # an fp32 model keeps them
    assert target_type(quant.F16, 576, "auto", bf16, "avx2") == quant.F16  # bf16 only stored there: as is
    # bf16 weights on AVX512-BF16 without AMX: in pair rows, which one kernel runs at every row count
    assert target_type(quant.F32, 576, "auto", bf16, "avx512", rows=576) == quant.BF16X16
    assert target_type(quant.BF16, 576, "auto", bf16, "avx512", rows=576) == quant.BF16X16
    assert target_type(quant.Q4_1, 576, "none", bf16, "avx512", rows=576) == quant.BF16X16
    assert target_type(quant.BF16, 576, "auto", bf16, "avx512", rows=40) == quant.BF16  # not whole groups
    assert target_type(quant.BF16, 576, "auto", f32, "avx512", rows=576) == quant.BF16  # fp32 activations
    assert target_type(quant.BF16, 576, "auto", bf16, "avx512f", rows=576) == quant.BF16X16  # FMAs there
    assert target_type(quant.BF16, 576, "auto", bf16, "amx", rows=576) == quant.BF16  # the tiles take them
    # int8 activations multiply blocks: asking for them keeps the blocks that have them
    assert target_type(quant.Q4_1, 576, "auto", bf16, "amx", int8=True) == quant.Q4_1
    assert target_type(quant.Q6_K, 512, "auto", bf16, "amx", int8=True) == quant.Q6_K
    assert target_type(quant.Q2_K, 512, "auto", bf16, "amx", int8=True) == quant.Q2_K
    assert target_type(quant.Q4_1, 576, "none", bf16, "avx2") == quant.BF16
    assert target_type(quant.F32, 576, "q4_0", f32, "avx2") == quant.Q4_0
    assert target_type(quant.F32, 576, "q4_0", f32, "avx2", vocab=True) == quant.Q8_0
    assert target_type(quant.F32, 48, "q8_0", f32, "avx2") == quant.F32  # rows that do not split into blocks
    # quantized at load for bf16 activations: regrouped for the CPU's bf16 kernel, as `auto` keeps a file's blocks
    assert target_type(quant.F32, 576, "q4_0", bf16, "amx", rows=576) == quant.Q4_0T16
    assert target_type(quant.F32, 576, "q4_1", bf16, "avx512", rows=576) == quant.Q4_1X16
    assert target_type(quant.F32, 576, "q4_0", bf16, "amx", int8=True, rows=576) == quant.Q4_0
    # Q4 blocks for bf16 inputs on AVX512-BF16: regrouped for its kernel, in linear layers of whole 16s
    # of rows; without AMX that kernel beats bf16 weights, so `auto` keeps the blocks there
    assert target_type(quant.Q4_1, 576, "auto", bf16, "avx512", rows=576) == quant.Q4_1X16
    assert target_type(quant.Q4_1, 576, "auto", bf16, "avx512", rows=40) == quant.BF16
    assert target_type(quant.Q4_1, 576, "auto", bf16, "avx512") == quant.BF16  # rows not given
    assert target_type(quant.Q4_K, 576, "auto", bf16, "avx512", vocab=True) == quant.Q4_K  # an embedding alone
    assert target_type(quant.Q8_0, 576, "auto", bf16, "avx512", rows=576) == quant.Q8_0X16
    assert target_type(quant.IQ4_NL, 576, "auto", bf16, "avx512", rows=576) == quant.IQ4_NLX16
    assert target_type(quant.Q4_K, 512, "auto", bf16, "avx512", rows=576) == quant.Q4_KX16
    assert target_type(quant.Q5_0, 576, "auto", bf16, "avx512", rows=576) == quant.Q5_0X16
    assert target_type(quant.Q5_K, 512, "auto", bf16, "avx512", rows=576) == quant.Q5_KX16
    assert target_type(quant.Q6_K, 512, "auto", bf16, "avx512", rows=576) == quant.Q6_KX16
    assert target_type(quant.IQ4_XS, 512, "auto", bf16, "avx512", rows=576) == quant.IQ4_XSX16
    assert target_type(quant.Q3_K, 512, "auto", bf16, "avx512", rows=576) == quant.Q3_KX16
    assert target_type(quant.Q2_K, 512, "auto", bf16, "avx512", rows=576) == quant.Q2_KX16
    # on AMX, Q4 layers keep those bf16 weights as blocks regrouped for the tiles, which decode them
    assert target_type(quant.Q4_1, 576, "auto", bf16, "amx", rows=576) == quant.Q4_1T16
    assert target_type(quant.Q4_0, 576, "auto", bf16, "amx", rows=576) == quant.Q4_0T16
    assert target_type(quant.Q8_0, 576, "auto", bf16, "amx", rows=49152, vocab=True) == quant.Q8_0T16  # tied
    assert target_type(quant.Q8_0, 576, "auto", bf16, "amx", vocab=True) == quant.Q8_0  # an embedding alone: looked up
    assert target_type(quant.F32, 576, "auto", bf16, "amx", vocab=True) == quant.BF16  # a float one takes the dtype
    assert target_type(quant.Q4_1, 576, "auto", bf16, "amx", rows=40) == quant.BF16
    assert target_type(quant.Q4_K, 512, "auto", bf16, "amx", rows=576) == quant.Q4_KT16
    assert target_type(quant.Q6_K, 512, "auto", bf16, "amx", rows=576) == quant.Q6_KT16
    assert target_type(quant.Q5_K, 512, "auto", bf16, "amx", rows=576) == quant.Q5_KT16
    assert target_type(quant.Q3_K, 512, "auto", bf16, "amx", rows=576) == quant.Q3_KT16
    assert target_type(quant.Q2_K, 512, "auto", bf16, "amx", rows=576) == quant.Q2_KT16
    assert target_type(quant.Q4_1, 576, "auto", bf16, "amx", rows=40) == quant.BF16  # rows not in groups of 16
    assert target_type(quant.IQ4_NL, 576, "auto", bf16, "amx", rows=576) == quant.IQ4_NLT16
    assert target_type(quant.IQ4_XS, 512, "auto", bf16, "amx", rows=576) == quant.IQ4_XST16
    assert target_type(quant.Q5_0, 576, "auto", bf16, "amx", rows=576) == quant.Q5_0T16
    assert target_type(quant.Q4_1, 576, "auto", bf16, "avx512", int8=True, rows=576) == quant.Q4_1
    # fp32 activations on AVX-512, with or without bf16 instructions or AMX: the regrouped blocks by FMAs
    for isa in ("avx512", "amx"):
        assert target_type(quant.Q4_1, 576, "auto", f32, isa, rows=576) == quant.Q4_1X16
        assert target_type(quant.Q4_K, 512, "auto", f32, isa, rows=576) == quant.Q4_KX16
        assert target_type(quant.F32, 576, "q4_0", f32, isa, rows=576) == quant.Q4_0X16
        assert target_type(quant.Q8_0, 576, "auto", f32, isa, rows=49152, vocab=True) == quant.Q8_0X16  # tied
        assert target_type(quant.F32, 576, "auto", f32, isa, rows=576) == quant.F32
    for isa in ("avx512f", "avx512vnni"):  # AVX-512 without bf16 instructions: fp32 their only activations
        assert target_type(quant.Q4_1, 576, "auto", f32, isa, rows=576) == quant.Q4_1X16
        assert target_type(quant.Q4_1, 576, "auto", f32, isa, int8=True, rows=576) == quant.Q4_1
    assert target_type(quant.Q6_K, 512, "auto", f32, "avx512f", rows=576) == quant.Q6_KX16
    assert target_type(quant.F32, 576, "q8_0", f32, "avx512f", rows=576) == quant.Q8_0X16
    assert target_type(quant.Q4_1, 576, "auto", f32, "avx512f") == quant.Q4_1  # an embedding alone
    assert target_type(quant.Q4_1, 576, "auto", f32, "avx512f", int8=True, rows=576) == quant.Q4_1
    assert target_type(quant.Q4_1, 576, "none", f32, "avx512f", rows=576) == quant.F32
    assert target_type(quant.BF16, 576, "auto", f32, "avx512f", rows=576) == quant.BF16
    assert target_type(quant.Q4_1, 576, "auto", f32, "avx2", rows=576) == quant.Q4_1


def test_int8_activations_are_reported_only_where_a_layer_has_them():
    from inferlab.model.layers.linear import Linear
    stored = random_weights(quant.Q4_1, 64, 64, seed=0)

    def layer(mode: str, int8: bool) -> Linear:
        lin = Linear(64, 64)
        lin.weight_loader(lin.weight, stored, wtype=quant.Q4_1)
        lin.process_weights_after_loading(mode, torch.float32, "avx2", int8=int8)
        return lin
    assert layer("auto", int8=True).int8_active  # q4_1 kept: its rows multiply int8 inputs
    assert not layer("none", int8=True).int8_active  # dequantized to fp32: nothing to take int8
    assert not layer("auto", int8=False).int8_active


@pytest.mark.parametrize("stored", [quant.BF16, quant.Q4_K, quant.Q8_0])
def test_a_rows_bits_do_not_depend_on_how_far_apart_x_keeps_its_rows(stored):
    """x as the rows of a wider tensor gives the bits of x itself (AMX took strided rows to its
    AVX-512 kernel, which sums in another order), in this CPU's kept layout of a bf16 model."""
    from inferlab.model.layers import keep
    native = kernels.native()
    wtype = keep.target_type(stored, 512, "auto", torch.bfloat16, native and native.isa, rows=48)
    data = quant.random_stored(stored, 48, 512, seed=3) if stored.dtype is None else torch.randn(48, 512).bfloat16()
    w = keep.convert(data, stored, wtype)
    for rows in (1, 4, 70):
        x = torch.randn(rows, 512).bfloat16()
        wide = torch.zeros(rows, 1024, dtype=torch.bfloat16)
        wide[:, :512] = x
        assert torch.equal(linear(x, w, wtype, out_dtype=torch.float32),
                           linear(wide[:, :512], w, wtype, out_dtype=torch.float32)), (wtype, rows)


def test_inputs_of_the_wrong_width_and_ids_past_the_vocabulary_are_errors_not_reads_past_the_end():
    """The kernels trust their sizes: x of another width read past its rows (garbage, or a crash at
    65,536), and so did an embedding lookup of id -1 or one past the vocabulary."""
    from inferlab.model.layers.linear import Embedding
    w = quant.random_stored(quant.Q8_0, 64, 512, seed=4)
    for width in (256, 1024):
        with pytest.raises(ValueError, match=f"x has {width} features per row"):
            linear(torch.randn(2, width), w, quant.Q8_0)
    with pytest.raises(ValueError, match="rows of 576 weights do not split into q6_K blocks of 256"):
        quant.random_stored(quant.Q6_K, 8, 576, seed=4)  # it returned rows of 512, which linear() then overran
    with pytest.raises(ValueError, match="rows of 576 weights do not split into q6_K blocks of 256"):
        linear(torch.randn(2, 576), quant.random_stored(quant.Q6_K, 8, 512, seed=4)[:, :420], quant.Q6_K)
    emb = Embedding(64, 512)
    emb.weight_loader(emb.weight, w, wtype=quant.Q8_0)
    emb.process_weights_after_loading("auto", torch.float32, kernels.native() and kernels.native().isa)
    assert torch.equal(emb(torch.tensor([0, 63])), quant.dequantize(w, quant.Q8_0)[[0, 63]])
    for bad in (-1, 64):
        with pytest.raises(IndexError, match=r"token ids must be in \[0, 64\)"):
            emb(torch.tensor([3, bad]))


@pytest.mark.parametrize("wtype", [quant.BF16, quant.F32, quant.Q8_0])
def test_a_bias_of_another_dtype_than_x_is_added_in_xs(wtype):
    """An fp32 bias beside bf16 activations (a layer built by hand, outside the loader) failed in
    the reference path with torch's dtype error."""
    w = quant.random_stored(wtype, 24, 64, seed=5) if wtype.dtype is None else torch.randn(24, 64).to(wtype.dtype)
    bias = torch.randn(24, dtype=torch.float64)
    exact = quant.dequantize(w, wtype).double() if wtype.dtype is None else w.double()
    for dtype, tol in ((torch.bfloat16, {"rtol": 1.6e-2, "atol": 0.1}), (torch.float32, {"rtol": 1e-5, "atol": 1e-4})):
        x = torch.randn(3, 64).to(dtype)
        torch.testing.assert_close(linear(x, w, wtype, bias).double(), x.double() @ exact.T + bias, **tol)


def test_the_format_helpers_say_what_they_cannot_do_and_take_no_rows():
    """No rows dequantize to no rows (gguf's numpy code raised on the reshape); a type regrouping or
    random blocks do not cover is one line naming it (a torch error, a bare KeyError before)."""
    assert quant.dequantize(torch.empty(0, quant.Q4_K.row_bytes(512), dtype=torch.uint8), quant.Q4_K).shape == (0, 512)
    with pytest.raises(ValueError, match="f32 rows do not regroup"):
        regroup.repack(torch.randn(32, 64), quant.F32)
    with pytest.raises(ValueError, match="random_stored cannot write iq2_xxs"):
        quant.random_stored(quant.BY_NAME["iq2_xxs"], 4, 256, seed=0)


def test_bf16_weights_whose_outputs_do_not_group_by_16_keep_a_rows_bits_past_64_rows(monkeypatch):
    """Such a matrix stays bf16, not the pair rows (`bf16x16`); with bf16 pair products (AMD's Zen 4
    and 5 by default) its calls past 64 rows went to oneDNN, so a row's bits changed with its batch."""
    from inferlab.model.layers.linear import Linear
    isa, loaded = "avx512", kernels.library()
    if loaded is None or isa not in loaded[1]:
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    k = kernels.for_isa(isa)
    monkeypatch.setattr(kernels, "native", lambda: k)
    before = k.products()
    try:
        k.products("bf16")
        lin = Linear(512, 40)
        lin.weight.weight_loader(lin.weight, torch.randn(40, 512).bfloat16())
        lin.process_weights_after_loading("auto", torch.bfloat16, isa)
        lin.out_dtype = torch.float32
        x = torch.randn(130, 512).bfloat16()
        assert lin.wtype == quant.BF16 and torch.equal(lin(x[:64]), lin(x)[:64])
    finally:
        k.products(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_input_reaches_the_int8_paths_outputs_as_the_reference_says(isa, dtype, monkeypatch):
    """`int8_inputs` (the path's definition) gives a block holding a NaN a NaN scale; the kernels
    skipped the NaN when taking max|x|, and gave the outputs of a 0 in its place."""
    k = kernels.for_isa(isa)
    monkeypatch.setattr(kernels, "native", lambda: k)
    for wtype, width in ((quant.Q8_0, 64), (quant.Q4_1, 64), (quant.Q6_K, 256)):
        x = torch.ones(3, width, dtype=dtype)
        x[1, 5] = float("nan")
        assert torch.isnan(int8_inputs(x)[1, :32]).all()
        y = linear(x, quant.random_stored(wtype, 16, width, seed=5), wtype, int8=True, out_dtype=torch.float32)
        assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any(), (wtype, y)


def test_block_sizes_are_the_same_in_python_c_and_gguf(tmp_path):
    """Each weight type's block (weights, bytes) is written in quant.py and in blocks.h: a program
    built from blocks.h prints the C's, and gguf's table is the formats' own."""
    import shutil
    import subprocess

    import gguf
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    types = [t for t in quant.BY_CODE.values() if t.native]
    src = tmp_path / "sizes.c"
    src.write_text('#include <stdio.h>\n#include "common.h"\nint main(void) {\n' + "".join(
        f'    printf("%d %d\\n", il_block_elems({t.code}), il_block_bytes({t.code}));\n' for t in types) + "}\n")
    subprocess.run(["cc", f"-I{kernels.ROOT}", str(src), "-o", str(tmp_path / "sizes"), "-lm"], check=True)
    printed = subprocess.run([str(tmp_path / "sizes")], capture_output=True, text=True, check=True).stdout.split("\n")
    assert {t.name: (t.block, t.nbytes) for t in types} == {
        t.name: tuple(map(int, line.split())) for t, line in zip(types, printed)}
    for t in quant.TYPES:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.code)] == (t.block, t.nbytes), t
