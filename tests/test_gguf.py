"""GGUF files run as they are stored. A tiny random Llama written as a K-quant-style mix (Q5_0 q/k,
Q8_0 v, so the merged q/k/v keeps two parts; Q4_K, Q5_K and Q6_K elsewhere; Q8_0 embeddings) gives
HF transformers' greedy output and logits, HF dequantizing the very same file, and so does one of
the low-bit types (Q2_K, Q3_K, IQ4_NL, IQ4_XS); the quantization modes convert what is stored as
they say."""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os

import numpy as np
import pytest
import torch

from inferlab import LLM, SamplingParams
from inferlab.model import gguf_file, loader, weight_cache
from inferlab.model.base import ModelLoadError
from inferlab.model.layers import quant, regroup
from inferlab.model.layers.rotary import RotaryEmbedding

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
TYPES = {"attn_q": quant.Q5_0, "attn_k": quant.Q5_0, "attn_v": quant.Q8_0, "attn_output": quant.Q4_K,
         "ffn_gate": quant.Q4_K, "ffn_up": quant.Q5_K, "ffn_down": quant.Q6_K}
LOW_BIT_TYPES = {"attn_q": quant.IQ4_NL, "attn_k": quant.IQ4_NL, "attn_v": quant.Q3_K, "attn_output": quant.Q2_K,
                 "ffn_gate": quant.IQ4_XS, "ffn_up": quant.Q3_K, "ffn_down": quant.Q2_K}
Q4_TYPES = {"attn_q": quant.Q4_1, "attn_k": quant.Q4_1, "attn_v": quant.Q4_0, "attn_output": quant.Q5_0,
            "ffn_gate": quant.Q4_K, "ffn_up": quant.Q5_K, "ffn_down": quant.Q6_K}
# types no kernel reads (gguf's numpy code dequantizes them at load), with a Q8_0 one: merged q/k/v of two parts
UNREAD_TYPES = {"attn_q": quant.BY_NAME["mxfp4"], "attn_k": quant.BY_NAME["tq2_0"], "attn_v": quant.Q8_0,
                "attn_output": quant.BY_NAME["iq2_xxs"], "ffn_gate": quant.BY_NAME["iq3_s"],
                "ffn_up": quant.BY_NAME["tq1_0"], "ffn_down": quant.BY_NAME["iq2_s"]}
# a random block's typical weight, in units of its fp16 scale (quantized Gaussians: about 20)
SPREAD = {quant.Q4_K: 256, quant.Q5_K: 512, quant.Q6_K: 1000, quant.Q2_K: 20, quant.Q3_K: 64, quant.IQ4_NL: 64,
          quant.IQ4_XS: 1000}


@pytest.fixture(scope="module")
def mixed_gguf(smol, tmp_path_factory):
    """The file's path; its tokenizer is the embedded model's (from the parsed-GGUF cache)."""
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "mixed.gguf"), TYPES)


@pytest.fixture(scope="module")
def low_bit_gguf(smol, tmp_path_factory):
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "low_bit.gguf"), LOW_BIT_TYPES)


@pytest.fixture(scope="module")
def unread_gguf(smol, tmp_path_factory):
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "unread.gguf"), UNREAD_TYPES)


@pytest.fixture(scope="module")
def q4_gguf(smol, tmp_path_factory):
    """Q4_1, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K layers (merged q/k/v and gate/up of two types), as in the
    embedded model's and llama.cpp's Q4_K_M and Q5_K_M files."""
    return write_gguf(str(tmp_path_factory.mktemp("gguf") / "q4.gguf"), Q4_TYPES)


@functools.lru_cache(maxsize=64)
def _random_stored(wtype: quant.WeightType, n: int, k: int, seed: int, scale: float) -> torch.Tensor:
    """`quant.random_stored`, once per module for the same arguments: the vocabulary matrix alone took
    a second to quantize for each of the ~20 files written here."""
    return quant.random_stored(wtype, n, k, seed=seed, scale=scale)


def write_gguf(path: str, types: dict[str, quant.WeightType], rope: dict | None = None, pre: str | None = None,
               meta: dict | None = None, vocab: dict | None = None, output: quant.WeightType | None = None) -> str:
    """`rope`: {"freqs": a rope_freqs.weight tensor} or {"linear": a scaling factor}; `pre`: the
    tokenizer's pre-tokenizer name (the embedded model's vocabulary and merges either way); `meta`:
    other values of block_count, head_count, head_count_kv or bos (the tensors stay those of the
    model's own), or split (the file then says it is part 1 of that many); `vocab`: tokenizer fields
    written instead of the embedded model's (tokenizer.ggml.model, tokens, token_type, then scores
    or merges); `output`: an LM head of that type of its own (else the vocabulary matrix is tied)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
    tok = vocab or weight_cache.load(loader.embedded_model_path())[2]
    meta = {"block_count": LAYERS, "head_count": HEADS, "head_count_kv": KV_HEADS, "bos": 1, **(meta or {})}
    w = GGUFWriter(path, "llama")
    if "split" in meta:
        w.add_uint16("split.no", 0)
        w.add_uint16("split.count", meta["split"])
    w.add_block_count(meta["block_count"])
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(meta["head_count"])
    w.add_head_count_kv(meta["head_count_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if rope and "linear" in rope:
        from gguf import RopeScalingType
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["linear"])
    if rope and "freqs" in rope:
        w.add_tensor("rope_freqs.weight", rope["freqs"].numpy())
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(pre or tok.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in tok:
        w.add_token_merges(tok["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in tok:
        w.add_token_scores(tok["tokenizer.ggml.scores"])
    w.add_bos_token_id(meta["bos"])
    w.add_eos_token_id(2)
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])
    g = torch.Generator().manual_seed(0)
    vocab = len(tok["tokenizer.ggml.tokens"])

    def add(name: str, wtype: quant.WeightType | GGMLQuantizationType, n: int, k: int, std: float) -> None:
        """Weights of about `std`: Gaussians quantized, or random blocks with scales to match (a ggml
        type of ours), or random bytes (one we do not read)."""
        if isinstance(wtype, GGMLQuantizationType):
            block, size = GGML_QUANT_SIZES[wtype]
            w.add_tensor(name, np.random.default_rng(0).integers(0, 256, (n, k // block * size), dtype=np.uint8),
                         raw_dtype=wtype)
            return
        if not wtype.native:
            data = _unread_blocks(wtype, n, k, std)
        elif wtype == quant.Q5_0:  # gguf writes it, the kernels do not
            from gguf import quantize
            data = torch.from_numpy(quantize((torch.randn(n, k, generator=g) * std).numpy(),
                                             GGMLQuantizationType.Q5_0))
        else:
            data = _random_stored(wtype, n, k, seed=len(name) * 31 + n, scale=std / SPREAD.get(wtype, 20))
        w.add_tensor(name, data.numpy(), raw_dtype=GGMLQuantizationType(wtype.code))

    add("token_embd.weight", quant.Q8_0, vocab, HIDDEN, std=1.0)  # decisive logits: greedy has no near-ties
    if output is not None:
        add("output.weight", output, vocab, HIDDEN, std=1.0)
    w.add_tensor("output_norm.weight", (1 + 0.3 * torch.randn(HIDDEN, generator=g)).numpy())
    q, kv = HEADS * HIDDEN // HEADS, KV_HEADS * HIDDEN // HEADS
    shapes = {"attn_q": (q, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN), "attn_output": (HIDDEN, q),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    for i in range(LAYERS):
        for part in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{part}.weight", (1 + 0.3 * torch.randn(HIDDEN, generator=g)).numpy())
        for part, (n, k) in shapes.items():
            add(f"blk.{i}.{part}.weight", types[part], n, k, std=2 / k ** 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _unread_blocks(wtype: quant.WeightType, n: int, k: int, std: float) -> torch.Tensor:
    """Gaussians of about `std` quantized by gguf where it writes the type; else (the i-quants) random
    blocks whose fp16 scale d, their first two bytes, is set to give weights of about `std`."""
    from gguf import GGMLQuantizationType, quantize
    gen = torch.Generator().manual_seed(n + k + wtype.code)
    try:
        return torch.from_numpy(quantize((torch.randn(n, k, generator=gen) * std).numpy(),
                                         GGMLQuantizationType(wtype.code)))
    except NotImplementedError:
        pass
    blocks = torch.randint(0, 256, (n * k // wtype.block, wtype.nbytes), generator=gen, dtype=torch.uint8)
    blocks[:, :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    d = std / quant.dequantize(blocks.view(n, -1), wtype).std().item()
    blocks[:, :2] = torch.tensor([d], dtype=torch.float16).view(torch.uint8)
    return blocks.view(n, -1)


def test_mixed_file_keeps_its_types_and_parts(mixed_gguf):
    """Each tensor keeps its type, regrouped (x16) where this CPU's kernels multiply fp32 inputs so."""
    from inferlab import kernels
    from inferlab.model.layers.keep import X16_DTYPES
    native = kernels.native()
    x16 = native is not None and torch.float32 in X16_DTYPES.get(native.isa, ())
    kept = {t: quant.REGROUPED[t] if x16 else t for t in (quant.Q5_0, quant.Q8_0, quant.Q6_K)}
    model, _ = loader.load_model(mixed_gguf, "float32", torch.device("cpu"))
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.wtype == kept[quant.Q5_0] and [p[1] for p in attn.qkv_proj.parts] == [kept[quant.Q8_0]]
    assert model.model.layers[0].mlp.down_proj.wtype == kept[quant.Q6_K]
    embed = model.model.embed_tokens
    assert embed.wtype == kept[quant.Q8_0] and model.lm_head.weight is embed.weight


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_embedding_apart_from_the_lm_head_keeps_its_blocks(tmp_path, dtype):
    """Nothing multiplies it, and lookups read any type: in a bf16 model on bf16 matrix units too,
    where a multiplied matrix becomes bf16 (a Q8_0 vocabulary took 2x its bytes, a Q4_K one 3.6x)."""
    path = write_gguf(str(tmp_path / "untied.gguf"), TYPES, output=quant.Q6_K)
    model, _ = loader.load_model(path, dtype, torch.device("cpu"))
    embed = model.model.embed_tokens
    assert embed.wtype == quant.Q8_0 and model.lm_head.weight is not embed.weight
    ids = torch.tensor([5, 0, 1234, 5])
    torch.testing.assert_close(embed(ids), quant.dequantize(embed.weight[ids], quant.Q8_0), rtol=0, atol=0)


def test_amx_keeps_q4_k_quants_and_q8_0_as_blocks_that_give_the_bf16_weights_bits(q4_gguf):
    """On AMX a bf16 model's Q4_0 / Q4_1 / Q5_0 / Q4_K / Q5_K / Q6_K layers and tied Q8_0 vocabulary stay
    blocks (regrouped for the tiles, merged layers' parts of two types included), in about a quarter of
    bf16's bytes (the vocabulary a half), and the model's greedy tokens and log-probabilities are bit for
    bit those of the same model with bf16 weights (`quantization="none"`): batched, through prefills past
    a decode step's 64 rows and decode steps under it."""
    from inferlab import kernels
    native = kernels.native()
    if native is None or native.isa != "amx":
        pytest.skip(f"the t16 blocks are AMX's (kernels here: {native and native.isa})")
    tiled, tok = loader.load_model(q4_gguf, "bfloat16", torch.device("cpu"))
    dense, _ = loader.load_model(q4_gguf, "bfloat16", torch.device("cpu"), quantization="none")
    qkv = tiled.model.layers[0].self_attn.qkv_proj
    assert [qkv.wtype] + [p[1] for p in qkv.parts] == [quant.Q4_1T16, quant.Q4_0T16]
    assert tiled.model.layers[0].mlp.down_proj.wtype == quant.Q6_KT16
    assert tiled.model.layers[0].self_attn.o_proj.wtype == quant.Q5_0T16
    gate_up = tiled.model.layers[0].mlp.gate_up_proj
    assert [gate_up.wtype] + [p[1] for p in gate_up.parts] == [quant.Q4_KT16, quant.Q5_KT16]
    embed = tiled.model.embed_tokens  # the tied Q8_0 vocabulary too: the LM head's tiles, and lookups
    assert embed.wtype == quant.Q8_0T16 and tiled.lm_head.weight is embed.weight
    ids = torch.tensor([5, 0, 1234, 5])
    assert torch.equal(embed(ids), dense.model.embed_tokens(ids))

    assert _layer_bytes(tiled) < 0.4 * _layer_bytes(dense)
    _assert_same_outputs(tiled, dense, tok)


def test_amx_keeps_the_low_bit_types_as_blocks_too(low_bit_gguf):
    """IQ4_NL, Q3_K, Q2_K and IQ4_XS layers on AMX: blocks the tiles decode, at a fifth of bf16's bytes,
    with the bf16 weights' tokens and log-probabilities."""
    from inferlab import kernels
    native = kernels.native()
    if native is None or native.isa != "amx":
        pytest.skip(f"the t16 blocks are AMX's (kernels here: {native and native.isa})")
    tiled, tok = loader.load_model(low_bit_gguf, "bfloat16", torch.device("cpu"))
    dense, _ = loader.load_model(low_bit_gguf, "bfloat16", torch.device("cpu"), quantization="none")
    layers = [m for m in tiled.model.layers.modules() if getattr(m, "wtype", None) is not None and hasattr(m, "parts")]
    kept = {m.wtype for m in layers} | {part[1] for m in layers for part in m.parts}
    assert kept == {quant.TILED[t] for t in LOW_BIT_TYPES.values()}
    assert _layer_bytes(tiled) < 0.25 * _layer_bytes(dense)
    _assert_same_outputs(tiled, dense, tok)


def _layer_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers.parameters())


def _assert_same_outputs(tiled, dense, tok) -> None:
    """Greedy tokens and log-probabilities, batched, through prefills past a decode step's 64 rows."""
    prompts = [{"prompt_token_ids": list(range(5 + i, 5 + i + n))} for i, n in enumerate((3, 70, 17, 130))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3, ignore_eos=True)
    outs = [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in
             LLM(loaded=(model, tok), num_kv_blocks=64, max_num_batched_tokens=96).generate(prompts, params,
                                                                                         use_tqdm=False)]
            for model in (tiled, dense)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("file", ["mixed_gguf", "low_bit_gguf", "unread_gguf"])
def test_file_matches_hf(file, chat_prompts, request):
    """Next-token log-probabilities after each prompt (a prefill) and after one more token (a decode
    step), batched, against HF's forward pass on the same tokens. (A random model's greedy text runs
    into near-ties within a few tokens, so the distributions are compared, not the text.)
    HF runs the file in float64 (its dequantized weights are the same numbers) and in float32: this
    engine's fp32 log-probabilities must lie within 256 fp32 steps of float64's, or, where HF's own
    fp32 run strays further (an input that fp32 represents poorly), within twice its distance. In some
    whole-suite runs both fp32 runs strayed ~4.7e-3 alike, as a rounding mode toward zero makes them
    (conftest's `default_fp_environment` now resets one a test leaves behind, and names the test)."""
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(file)
    exact = _hf_model(transformers, path, torch.float64)
    hf32 = copy.deepcopy(exact).to(torch.float32)  # the dequantized weights are fp32 numbers: cast exactly
    llm = LLM(model=path, num_kv_blocks=128, dtype="float32")  # auto is bf16 on CPUs with bf16 instructions
    layers = [m for m in llm.engine.model.modules() if getattr(m, "wtype", None) is not None]
    kept = {m.wtype for m in layers} | {part[1] for m in layers for part in getattr(m, "parts", [])}
    kept = {t.base or t for t in kept}  # regrouped (x16) blocks are the stored ones, moved
    stored = {"mixed_gguf": TYPES, "low_bit_gguf": LOW_BIT_TYPES, "unread_gguf": UNREAD_TYPES}[file].values()
    assert {t if t.native else quant.F32 for t in stored} <= kept  # as stored, or dequantized at load
    prompts = chat_prompts[:4]
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for ids, out in zip(prompts, outs, strict=True):
        seq = torch.tensor([ids + out.outputs[0].token_ids[:1]])
        with torch.inference_mode():
            logits = exact(seq).logits[0, -2:]
            theirs = torch.log_softmax(hf32(seq).logits[0, -2:].double(), -1)
        want = torch.log_softmax(logits, -1)
        # fp32 sums err in proportion to the values summed: these random models' logits reach ~70,
        # where an fp32 step is 7.6e-6; this engine's largest error here is ~20 such steps
        tol = 256 * torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(logits.abs().max().item()))
        for step in range(2):
            got = out.outputs[0].logprobs[step]
            worst = max(abs(v - want[step, t].item()) for t, v in got.items())
            hf_worst = max(abs(theirs[step, t] - want[step, t]).item() for t in got)
            assert worst < max(tol, 2 * hf_worst), \
                f"step {step}: {worst:.3g} from float64's (allowed {tol:.3g}); HF's float32 run: {hf_worst:.3g}"
            assert max(got, key=got.get) == want[step].argmax().item()


def _hf_model(transformers, path: str, dtype: torch.dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype).eval()


@pytest.mark.parametrize("meta, message", [
    ({"block_count": 10 ** 6}, "block_count is 1000000, but the file holds tensors for 2 layers"),  # it took 8 GB
    ({"block_count": 1}, "block_count is 1, but the file holds tensors for 2 layers"),  # ran with one layer of two
    ({"head_count_kv": 3}, r"num_kv_heads=3 \(it must divide num_heads=4\)"),  # every request failed
    ({"head_count_kv": 0}, r"num_kv_heads=0 \(a positive integer\)"),
    ({"head_count": 0}, "head_count 0 does not divide embedding_length 256"),
    ({"head_count_kv": [2, 1]}, r"head_count_kv differs between layers \(\[1, 2\]\)"),
    ({"bos": 10 ** 6}, "bos_token_id 1000000 is outside the vocabulary of 49152 tokens"),
    ({"split": 2}, "is part 1 of 2 of a split GGUF: merge the parts"),
])
def test_metadata_no_model_can_have_is_one_line_before_the_model_is_built(meta, message, tmp_path):
    """Each was a traceback (ZeroDivisionError, IndexError), a hang, or a model that loaded and ran wrong."""
    path = write_gguf(str(tmp_path / "bad.gguf"), TYPES, meta=meta)
    with pytest.raises(ModelLoadError, match=message):
        loader.load_model(path, "float32", torch.device("cpu"))


def test_merges_written_as_pairs_are_one_line(tmp_path):
    """gguf's writer stores tokenizer.json's newer [a, b] merges as arrays when given them, which was
    an AttributeError at load."""
    tok = gguf_file.parse(loader.embedded_model_path())[2]
    pairs = {**tok, "tokenizer.ggml.merges": [m.split(" ") for m in tok["tokenizer.ggml.merges"][:50]]}
    with pytest.raises(ModelLoadError, match=r"tokenizer.ggml.merges must list strings \("):
        loader.load_model(write_gguf(str(tmp_path / "pairs.gguf"), TYPES, vocab=pairs), "float32", torch.device("cpu"))


def test_a_gguf_is_known_by_its_magic_and_per_layer_head_counts_of_one_value_are_read(tmp_path):
    """Ollama keeps its GGUFs as blobs named by their hash; GGUF may write head counts per layer."""
    path = write_gguf(str(tmp_path / "blob"), TYPES, meta={"head_count_kv": [KV_HEADS] * LAYERS})
    model, _ = loader.load_model(path, "float32", torch.device("cpu"))
    assert model.args.num_kv_heads == KV_HEADS and model.model.layers[0].self_attn.qkv_proj.wtype is not None


# line breaks, spaces before code, digits, contractions, letters with marks, CRLF: where the splits differ
SPLIT_TEXTS = ["hello   world\n\nnew", "def f(x):\n    return x * 12345\n", "a\r\n\r\nb", "I'LL see you're 2026's",
               "naïve café — ok?!\n\n\n", "path/to/file.py:42", "  leading and trailing  ", "x\ty\u00a0z"]


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_gguf_pre_tokenizer_splits_text_as_hf_does(pre, tmp_path):
    """A GGUF's `tokenizer.ggml.pre` chooses how text is cut before the merges (Qwen2's and Llama 3's
    expressions, not GPT-2's): the same tokens as HF's tokenizer of the same file."""
    transformers = pytest.importorskip("transformers")
    path = write_gguf(str(tmp_path / "pre.gguf"), TYPES, pre=pre)
    ours = loader.load_model(path, "float32", torch.device("cpu"))[1]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="pre.gguf")
    for text in SPLIT_TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    gpt2 = _with_gpt2_split(ours)
    differ = sum(ours.encode(t, add_special_tokens=False) != gpt2.encode(t, add_special_tokens=False)
                 for t in SPLIT_TEXTS)
    assert differ >= 2  # the texts do tell the expressions apart


def _with_gpt2_split(tok):
    """The same vocabulary and merges, text cut by GPT-2's expression."""
    from tokenizers import pre_tokenizers

    from inferlab.model.tokenizer import Tokenizer
    backend = tok.backend.__class__.from_str(tok.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return Tokenizer(backend, tok.eos_token_ids)


@pytest.mark.parametrize("mode,kept", [("none", quant.F32), ("q8_0", quant.Q8_0), ("q4_0", quant.Q4_0)])
def test_quantization_modes_convert_what_is_stored(mixed_gguf, mode, kept, caplog):
    """Blocks of another type are quantized again, with a warning (llama-quantize asks for
    --allow-requantize first)."""
    with caplog.at_level("WARNING", logger="inferlab"):
        model, _ = loader.load_model(mixed_gguf, "float32", torch.device("cpu"), quantization=mode)
    assert (f"are dequantized and quantized again to {mode}" in caplog.text) == (mode != "none")
    layer = model.model.layers[1]

    def base(t: quant.WeightType) -> quant.WeightType:  # regrouped (x16) where the CPU's kernels take them so
        return t.base or t
    assert base(layer.self_attn.qkv_proj.wtype) == kept and not layer.self_attn.qkv_proj.parts  # one type: one part
    assert base(layer.mlp.down_proj.wtype) == kept
    vocab = base(model.model.embed_tokens.wtype)
    assert vocab == (quant.F32 if mode == "none" else quant.Q8_0)  # the vocabulary matrix: q8_0
    assert np.isfinite(model.lm_head.weight.float().numpy()).all() if mode == "none" else True


def test_float16_on_cpu_gets_float16_weights_not_blocks_each_op_would_dequantize(mixed_gguf, caplog):
    """No native kernel takes fp16 activations, so PyTorch's ops run them: `auto` then keeps the
    weights in fp16 as it does without kernels (blocks cost a dequantization per op: a token of the
    embedded model took 898 ms that way, 58 as fp16 weights), and the load says fp16 is the slow choice."""
    with caplog.at_level("WARNING", logger="inferlab"):
        model, _ = loader.load_model(mixed_gguf, "float16", torch.device("cpu"))
    assert "float16 on CPU runs PyTorch's ops" in caplog.text
    layer = model.model.layers[1]
    assert layer.self_attn.qkv_proj.wtype == quant.F16 and not layer.self_attn.qkv_proj.parts
    assert layer.mlp.down_proj.wtype == quant.F16 and model.model.embed_tokens.wtype == quant.F16
    fp32, _ = loader.load_model(mixed_gguf, "float32", torch.device("cpu"))
    x = torch.randn(3, INTER, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer.mlp.down_proj(x.half()).float(), fp32.model.layers[1].mlp.down_proj(x),
                               rtol=2e-2, atol=2e-2)  # the stored Q6_K weights, rounded to fp16 once


@pytest.mark.parametrize("units", ["avx512", "amx"])
def test_bf16_matrix_units_regroup_block_layers(mixed_gguf, units, monkeypatch):
    """`--quantization q4_0` in a bf16 model on bf16 matrix units: the Q4_0 layers are regrouped for
    the CPU's kernel (AVX512-BF16: x16; AMX: t16, as `auto` keeps a file's blocks there, the tiles
    batching them 3.5x faster). Merged q/k/v and gate/up shards included, they hold the very blocks
    an fp32 model keeps as stored, and the layer's output is the blocks' product (x16: exact, rounded
    once; t16: of their bf16 weights). So is the tied q8_0 vocabulary."""
    from inferlab import kernels
    from inferlab.model.layers import tiles
    from inferlab.model.layers.linear import linear_ref
    try:
        native = kernels.for_isa(units)
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    monkeypatch.setattr(kernels, "native", lambda: native)
    layout, table = (regroup, quant.REGROUPED) if units == "avx512" else (tiles, quant.TILED)
    q4, q8 = table[quant.Q4_0], table[quant.Q8_0]
    stored, _ = loader.load_model(mixed_gguf, "float32", torch.device("cpu"), quantization="q4_0")
    regrouped, _ = loader.load_model(mixed_gguf, "bfloat16", torch.device("cpu"), quantization="q4_0")
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2)).bfloat16()
    for name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        a, b = stored.get_submodule(f"model.layers.1.{name}"), regrouped.get_submodule(f"model.layers.1.{name}")
        a_weight = a.weight if a.wtype == quant.Q4_0 else regroup.unrepack(a.weight, a.wtype)  # fp32 inputs: x16 too
        assert (a.wtype.base or a.wtype) == quant.Q4_0 and b.wtype == q4
        assert torch.equal(layout.unrepack(b.weight, q4), a_weight)
        want = linear_ref(x, a_weight, quant.Q4_0, None) if units == "avx512" else linear_ref(x, b.weight, q4, None)
        torch.testing.assert_close(b(x), want, rtol=8e-3, atol=1e-2)
    # the tied vocabulary matrix too (q8_0): the LM head multiplies it, the embedding looks rows up in it
    embed = regrouped.model.embed_tokens
    assert embed.wtype == q8 and regrouped.lm_head.weight is embed.weight
    ids = torch.tensor([5, 0, 1234, 5])
    want = stored.model.embed_tokens(ids)
    assert torch.equal(embed(ids), want if units == "avx512" else want.bfloat16())


@pytest.mark.parametrize("file", ["mixed_gguf", "low_bit_gguf"])
def test_a_bf16_model_without_amx_keeps_every_block_type_regrouped(file, monkeypatch, request):
    """On an AVX512-BF16 CPU without AMX, `auto` keeps each of the file's block types (Q5_0 and Q8_0
    parts of the merged q/k/v, Q4_K, Q5_K, Q6_K; the low-bit file's IQ4_NL, Q3_K, Q2_K, IQ4_XS)
    regrouped for its kernel, the very blocks an fp32 model keeps; its next-token distribution has
    the fp32 model's top token and (mixed file) is closer to it than the same model with bf16 weights
    (`quantization="none"`), whose weights are rounded. The low-bit random model's spread of weights
    makes its logits move with the bf16 activations' rounding more than with the weights'."""
    from inferlab import kernels
    path = request.getfixturevalue(file)
    try:
        avx512 = kernels.for_isa("avx512")
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    monkeypatch.setattr(kernels, "native", lambda: avx512)
    fp32, _ = loader.load_model(path, "float32", torch.device("cpu"))
    bf16, _ = loader.load_model(path, "bfloat16", torch.device("cpu"))
    kept = set()
    for name, module in bf16.named_modules():
        if getattr(module, "wtype", None) is None or module.wtype.dtype is not None:
            continue
        stored = fp32.get_submodule(name)
        types = [module.wtype] + [part[1] for part in getattr(module, "parts", [])]
        assert types == [stored.wtype] + [p[1] for p in getattr(stored, "parts", [])], name
        assert all(t in quant.REGROUPED.values() for t in types) and torch.equal(module.weight, stored.weight), name
        kept.update(types)
    assert {quant.REGROUPED[t] for t in (TYPES if file == "mixed_gguf" else LOW_BIT_TYPES).values()} <= kept
    prompt = [{"prompt_token_ids": [1, 415, 5788, 282, 4649, 314]}]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    want, got, rounded = (LLM(model=path, num_kv_blocks=32, dtype=d, quantization=q)
                          .generate(prompt, params, use_tqdm=False)[0].outputs[0].logprobs[0]
                          for d, q in (("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "none")))
    assert max(got, key=got.get) == max(want, key=want.get)
    top = sorted(want, key=want.get, reverse=True)[:2]  # in every top 5 here
    if file == "mixed_gguf":
        assert max(abs(got[t] - want[t]) for t in top) < max(abs(rounded[t] - want[t]) for t in top)


def test_rope_freqs_divide_each_frequency_as_llama_cpp_does(smol, tmp_path, monkeypatch):
    """Llama 3.1+ GGUFs carry their RoPE scaling as `rope_freqs.weight`, a divisor per frequency. All
    divisors 4 must be the same model as linear scaling by 4 (rope.scaling keys); uneven ones, the
    frequencies divided one by one."""
    half = HIDDEN // HEADS // 2
    by_freqs = write_gguf(str(tmp_path / "freqs.gguf"), TYPES, rope={"freqs": torch.full((half,), 4.0)})
    by_linear = write_gguf(str(tmp_path / "linear.gguf"), TYPES, rope={"linear": 4.0})
    plain = write_gguf(str(tmp_path / "plain.gguf"), TYPES)
    uneven = torch.linspace(1.0, 8.0, half)
    uneven_file = write_gguf(str(tmp_path / "uneven.gguf"), TYPES, rope={"freqs": uneven})
    bad = write_gguf(str(tmp_path / "bad.gguf"), TYPES, rope={"freqs": torch.ones(3)})
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))  # files parsed here, and read back
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    ids = {"prompt_token_ids": list(range(100, 160))}
    lps = [LLM(model=p, dtype="float32", num_kv_blocks=32).generate(ids, params, use_tqdm=False)[0].outputs[0].logprobs
           for p in (by_freqs, by_linear, plain)]
    assert lps[0] == lps[1] and lps[0] != lps[2]
    for _ in range(2):  # parsed, then from the cache
        model, _ = loader.load_model(uneven_file, "float32", torch.device("cpu"))
    base = 1.0 / 10000.0 ** (torch.arange(0, 2 * half, 2).float() / (2 * half))
    rotary = next(m for m in model.modules() if isinstance(m, RotaryEmbedding))
    torch.testing.assert_close(rotary.inv_freq, base / uneven)
    with pytest.raises(ModelLoadError, match="rope_freqs.weight has 3 factors"):
        loader.load_model(bad, "float32", torch.device("cpu"))


def test_the_reader_reads_what_the_gguf_package_reads(low_bit_gguf):
    """Every metadata value and every tensor's bytes and shape, against the gguf package's reader (30x
    slower: 2.6 s of a start on the embedded model's vocabulary)."""
    from gguf import GGUFReader

    from inferlab.model.gguf_reader import GGUFFile
    ours, theirs = GGUFFile(low_bit_gguf), GGUFReader(low_bit_gguf)
    assert ours.fields == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.type_code == int(b.tensor_type) and a.data.shape == b.data.shape
        assert np.array_equal(a.data.view(np.uint8), np.asarray(b.data).view(np.uint8))


@pytest.mark.parametrize("cut", [10, 24, 200, 3_000, 50_000_000, -100])
def test_a_file_cut_short_is_named_so(tmp_path, cut):
    """(An interrupted download: numpy's reshape and index errors alone never said what was wrong),
    in the header's counts, its metadata or the tensors' data."""
    whole = open(loader.embedded_model_path(), "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:cut])
    with pytest.raises(ModelLoadError, match=f"it is cut short at {len(whole[:cut]):,} bytes"):
        loader.load_model(str(path), "float32", torch.device("cpu"))


@pytest.mark.parametrize("content, message", [(b"hello world\n", "does not start with GGUF's magic bytes"),
                                              (b"", "it is empty")])
def test_a_gguf_named_file_that_is_none_says_so(tmp_path, content, message):
    (path := tmp_path / "x.gguf").write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        loader.load_model(str(path), "float32", torch.device("cpu"))


def test_a_type_it_cannot_read_is_named_at_load(tmp_path, smol):
    from gguf import GGMLQuantizationType

    from inferlab.model.base import ModelLoadError
    path = write_gguf(str(tmp_path / "q8_1.gguf"), {**TYPES, "ffn_up": GGMLQuantizationType.Q8_1})
    with pytest.raises(ModelLoadError, match="'blk.0.ffn_up.weight' has type Q8_1, which InferLab cannot read"):
        loader.load_model(path, "float32", torch.device("cpu"))


def test_a_type_the_installed_gguf_cannot_dequantize_is_named_at_load(unread_gguf, monkeypatch):
    import gguf

    from inferlab.model.base import ModelLoadError
    real = gguf.dequantize

    def older_gguf(data, qtype):
        if qtype == gguf.GGMLQuantizationType.MXFP4:
            raise NotImplementedError("Dequantization for MXFP4 is not yet implemented")
        return real(data, qtype)
    monkeypatch.setattr(gguf, "dequantize", older_gguf)
    monkeypatch.setenv("INFERLAB_MODEL_CACHE", "0")  # parse the file again, where the check runs
    with pytest.raises(ModelLoadError, match=r"'blk.0.attn_q.weight': the installed gguf package \(.*\) cannot "
                                             r"dequantize mxfp4; a newer one may: pip install -U gguf"):
        loader.load_model(unread_gguf, "float32", torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_types_no_kernel_reads_are_dequantized_at_load_and_said_so(unread_gguf, dtype, caplog):
    """MXFP4, TQ1_0/TQ2_0 and i-quant layers (llama.cpp's types no kernel here reads) load as gguf's
    dequantization of their blocks in the model's dtype, with a warning that names them; the Q8_0 part
    of the same merged q/k/v stays blocks (or the bf16 weights they give, as anywhere), and
    `--quantization q8_0` quantizes the dequantized values."""
    from gguf import GGUFReader
    with caplog.at_level("WARNING", logger="inferlab"):
        model, _ = loader.load_model(unread_gguf, dtype, torch.device("cpu"))
    assert ("12 tensors are of types no kernel here reads (2 mxfp4, 2 tq2_0, 2 iq2_xxs, 2 iq3_s, 2 tq1_0, 2 iq2_s): "
            f"dequantized at load, to {dtype}") in caplog.text
    stored = {t.name: t for t in GGUFReader(unread_gguf).tensors}
    layer = model.model.layers[1]
    for name, part in (("mlp.down_proj", "ffn_down"), ("self_attn.o_proj", "attn_output")):
        module = layer.get_submodule(name)
        raw = torch.from_numpy(np.array(stored[f"blk.1.{part}.weight"].data))
        want = quant.dequantize(raw, UNREAD_TYPES[part]).to(getattr(torch, dtype))
        if module.wtype == quant.BF16X16:  # bf16 weights on AVX512-BF16 without AMX: in pair rows
            assert torch.equal(regroup.unrepack(module.weight, module.wtype), want)
        else:
            assert module.wtype == quant.BY_DTYPE[getattr(torch, dtype)] and torch.equal(module.weight, want)
    qkv = layer.self_attn.qkv_proj
    assert qkv.parts and qkv.parts[0][1] in (quant.Q8_0, quant.Q8_0T16, quant.Q8_0X16, quant.BF16, quant.BF16X16)
    requantized, _ = loader.load_model(unread_gguf, "float32", torch.device("cpu"), quantization="q8_0")
    down = requantized.model.layers[1].mlp.down_proj
    assert down.wtype in (quant.Q8_0, quant.Q8_0X16)  # regrouped where fp32 inputs take them so
    weight = down.weight if down.wtype == quant.Q8_0 else regroup.unrepack(down.weight, down.wtype)
    raw = torch.from_numpy(np.array(stored["blk.1.ffn_down.weight"].data))
    assert torch.equal(weight, quant.quantize(quant.dequantize(raw, quant.BY_NAME["iq2_s"]), quant.Q8_0))


def test_unknown_quantization_is_one_clear_error_and_the_names_take_any_case():
    """llama.cpp's users write the types as Q8_0; the CLI refused that, naming q8_0 among its choices."""
    from inferlab import EngineConfig
    from inferlab.cli_args import add_engine_args
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="q3_k")
    assert EngineConfig(quantization="Q4_0").quantization == "q4_0"
    assert EngineConfig(speculative_config={"method": "draft_model", "model": "embedded", "quantization": "Q8_0",
                                            "num_speculative_tokens": 2}).speculative_config.quantization == "q8_0"
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args(["--quantization", "Q8_0"]).quantization == "q8_0"
