"""Parity with transformers on tiny random HF checkpoints built here, and the loader's one-line errors.

Each checkpoint is written by transformers' own model class (`save_pretrained`, safetensors) into a
tmp dir: Llama (untied and tied embeddings), Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm and a head_dim
that is not hidden/heads). Every weight is randomised, norms and biases included, so a weight that
is dropped or misplaced shows in the logits. The tokenizer is a byte-level BPE trained in-test;
nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from inferlab import LLM, EngineConfig, LLMEngine, SamplingParams
from inferlab.model.layers import AttentionMetadata, PrefillSeq
from inferlab.model.loader import ModelLoadError, load_model

BLOCK_SIZE = 4
NEW_TOKENS = 12
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join while others decode.",
    "Prefix caching reuses the blocks of a shared prompt prefix.",
    "def add(a, b):\n    return a + b  # numbers, 12345 and symbols {}[]!?",
    "Greedy decoding picks the most likely token at every step.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
# name -> (config class, model class, config overrides). Non-default rope thetas, so that a theta
# read from the wrong config key shows.
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    # every bias the configs can ask for: q/k/v and o (attention_bias), gate/up and down (mlp_bias)
    "llama_biased": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "qwen3_biased": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "attention_bias": True}),
    # bare decoders, as transformers' AutoModel saves them (no LM head, no "model." in the names)
    "qwen3_bare": ("Qwen3Config", "Qwen3Model", {"head_dim": 32, "tie_word_embeddings": True}),
    "llama_bare": ("LlamaConfig", "LlamaModel", {}),
}
PARITY = ["llama", "llama_tied", "qwen2", "qwen3", "llama_biased", "qwen3_biased"]


@dataclass
class Checkpoint:
    name: str
    path: str
    hf: torch.nn.Module  # the transformers model the folder was saved from
    prompts: list[list[int]]  # three prompts of different lengths, crossing block boundaries


def train_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """HF's init leaves norms at 1 and biases at 0, which would hide them being ignored; it also
    makes logits nearly flat. Draw everything at a scale that gives decisive greedy choices, saved
    buffers too (DeepSeek-V3's expert correction bias)."""
    g = torch.Generator().manual_seed(seed)
    saved = model.state_dict()
    buffers = [(name, b) for name, b in model.named_buffers() if name in saved]
    for name, p in [*model.named_parameters(), *buffers]:  # a tied lm_head is deduplicated away
        r = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * r)
        elif name.endswith("bias"):
            p.copy_(0.5 * r)
        elif "embed_tokens" in name:
            p.copy_(r)
        else:
            p.copy_(2 * r / p.shape[1] ** 0.5)


def build_checkpoint(name: str, path: str, tok: HFTokenizer, spec: tuple[str, str, dict] | None = None,
                     shape: dict | None = None) -> Checkpoint:
    """`spec` (config class, model class, overrides) defaults to SPECS[name], `shape` to SMALL."""
    cfg_cls, model_cls, overrides = spec or SPECS[name]
    eos_id = tok.token_to_id("<|endoftext|>")
    config = getattr(transformers, cfg_cls)(vocab_size=tok.get_vocab_size(), bos_token_id=None, eos_token_id=eos_id,
                                            pad_token_id=eos_id, **(shape or SMALL), **overrides)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(config).float().eval()
    randomize(hf, seed=sum(map(ord, name)))
    hf.save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    ids = tok.encode(" ".join(CORPUS)).ids
    return Checkpoint(name, path, hf, [ids[:3], ids[10:19], ids[30:44]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matmuls are tiny: on a busy 2-core box, handing them between threads costs ~40x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lazily(build, tmp_path_factory) -> callable:
    """get(name): build(name, a fresh tmp dir) on first use, the same checkpoint after."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = build(name, str(tmp_path_factory.mktemp(name)))
        return built[name]

    return get


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Builds each checkpoint on first use, once per module."""
    tok = train_tokenizer()
    return lazily(lambda name, path: build_checkpoint(name, path, tok), tmp_path_factory)


@pytest.fixture(scope="module", params=PARITY)
def ckpt(request, checkpoints) -> Checkpoint:
    return checkpoints(request.param)


@torch.no_grad()
def hf_logits(ckpt: Checkpoint, ids: list[int]) -> torch.Tensor:
    return ckpt.hf(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def paged_logits(engine: LLMEngine, ids: list[int], chunks: list[int], table: list[int]) -> torch.Tensor:
    """Run `ids` through our model chunk by chunk, one sequence whose KV lives in `table`'s blocks;
    a chunk of one token goes the decode path. Returns the logits at every position."""
    model, bs, out, start = engine.model, BLOCK_SIZE, [], 0
    for n in chunks:
        end = start + n
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(start, end)])
        used = table[:-(-end // bs)]
        if n == 1:  # pad the table with block 0 as the runner does for a batch of decodes
            meta = AttentionMetadata(slots, [], torch.tensor([0]), torch.tensor([used + [0] * 3]),
                                     torch.tensor([end]))
        else:
            meta = AttentionMetadata(slots, [PrefillSeq(0, n, end, torch.tensor(used))], None, None, None)
        hidden = model(torch.tensor(ids[start:end]), torch.arange(start, end), engine.runner.kv_caches, meta)
        out.append(model.compute_logits(hidden))
        start = end
    assert start == len(ids)
    return torch.cat(out)


def make_engine(path: str, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE, **kwargs))


def make_llm(path: str, **kwargs) -> LLM:
    return LLM(model=path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE, **kwargs)


# --- parity -----------------------------------------------------------------------------------

def test_weights_match_checkpoint(ckpt):
    """Every HF tensor lands in our model, fused shards in their place; nothing is left at init."""
    model, _ = load_model(ckpt.path, "float32", torch.device("cpu"))
    ours = dict(model.named_parameters(remove_duplicate=False))
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in ckpt.hf.state_dict().items():  # a tied lm_head.weight is listed too
        for proj, (target, idx) in fused.items():
            if f".{proj}." in name:
                pieces.setdefault(name.replace(f".{proj}.", f".{target}."), {})[idx] = t
                break
        else:
            pieces[name] = {0: t}
    assert set(ours) == set(pieces)
    for name, parts in pieces.items():
        torch.testing.assert_close(ours[name], torch.cat([parts[i] for i in sorted(parts)]), rtol=0, atol=0,
                                   msg=name)
    if ckpt.name in ("qwen2", "llama_biased", "qwen3_biased"):  # the biases this test exists for are really there
        assert model.model.layers[0].self_attn.qkv_proj.bias.abs().min() > 0
        assert (model.model.layers[0].self_attn.o_proj.bias is None) == (ckpt.name == "qwen2")
    if ckpt.name == "llama_biased":
        assert model.model.layers[0].mlp.down_proj.bias.abs().min() > 0
    if ckpt.name == "qwen3":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (32,)
        assert (model.model.layers[0].self_attn.q_norm.weight - 1).abs().max() > 0.1


@pytest.mark.parametrize("chunks", [[14, 1, 1, 1], [5, 9, 1, 1, 1], [14, 3]], ids=["prefill", "chunked", "cached"])
def test_logits_parity(ckpt, chunks):
    """Prefill, chunked prefill (attention reads the KV cache) and decode steps all give HF's logits."""
    ids = ckpt.prompts[2] + ckpt.prompts[1][:3]
    expected = hf_logits(ckpt, ids)
    assert expected.std() > 1  # far from flat: a tolerance of 1e-4 is a real check
    engine = make_engine(ckpt.path)
    table = [9, 2, 17, 5, 30]  # scattered blocks, so a wrong slot or block lookup shows
    torch.testing.assert_close(paged_logits(engine, ids, chunks, table), expected, atol=1e-4, rtol=1e-4)


def test_decode_ignores_unwritten_kv_slots(checkpoints, monkeypatch):
    """Whatever torch.empty hands back (recycled heap memory: any bits, NaN included) must not reach
    the logits: a decode step attends over whole blocks and padding block 0, masked."""
    ckpt = checkpoints("llama")
    ids = ckpt.prompts[2] + ckpt.prompts[1][:2]
    empty = torch.empty

    def poisoned_empty(*args, **kwargs) -> torch.Tensor:
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    engine = LLMEngine(EngineConfig(model=ckpt.path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE))
    monkeypatch.undo()
    assert not engine.runner.kv_cache.any()  # the pool starts zeroed, whatever the allocator did
    torch.testing.assert_close(paged_logits(engine, ids, [14, 1, 1], [9, 2, 17, 5]), hf_logits(ckpt, ids),
                               atol=1e-4, rtol=1e-4)


def test_greedy_generation_parity(ckpt):
    """Greedy output equals HF generate token for token: alone, batched with prefix-cache hits, and
    batched again with tiny steps that mix prefill chunks and decodes."""
    expected = []
    for p in ckpt.prompts:
        out = ckpt.hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        expected.append(out[0, len(p):].tolist())
    assert len({tuple(e) for e in expected}) == 3
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in ckpt.prompts]
    llm = make_llm(ckpt.path)
    alone = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert alone == expected
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert batched == expected
    chunky = make_llm(ckpt.path, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in chunky.generate(prompts, params, use_tqdm=False)] == expected


def test_a_quantization_mode_says_which_layers_its_blocks_cannot_take(tmp_path, caplog):
    """Rows of 48 inputs do not split into q8_0's blocks of 32: those layers stay float, and the log
    says so (before, only the weights line showed nothing had been quantized)."""
    shape = {**SMALL, "hidden_size": 48, "intermediate_size": 96}
    ckpt = build_checkpoint("llama", str(tmp_path / "narrow"), train_tokenizer(), shape=shape)
    llm = make_llm(ckpt.path, quantization="q8_0")
    narrow = [m for m in llm.engine.model.modules() if getattr(m, "in_features", 0) == 48]
    assert narrow and all(m.wtype.dtype == torch.float32 for m in narrow)  # qkv, gate/up, the LM head
    assert f"--quantization q8_0: {len(narrow)} linear layers stay float32, their rows of [48] inputs" in caplog.text


@pytest.mark.parametrize("cls, window_fields", [
    ("Mistral", {"sliding_window": 16}),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
])
def test_a_sliding_window_limits_the_context_to_the_window(cls, window_fields, tmp_path, caplog):
    """No sliding-window attention here: the context stops at the window, where full attention is the
    same computation, so the output is still transformers' (unlimited, it went wrong past the window)."""
    tok = train_tokenizer()
    ckpt = build_checkpoint(cls, str(tmp_path / cls), tok, (f"{cls}Config", f"{cls}ForCausalLM", window_fields))
    llm = make_llm(ckpt.path)
    assert llm.engine.max_model_len == 16 and "sliding window of 16 tokens" in caplog.text
    ids = ckpt.prompts[1]  # 9 tokens, then 7 more: the whole window
    with torch.no_grad():
        want = ckpt.hf.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False)[0, len(ids):].tolist()
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    with pytest.raises(ValueError, match="max_model_len is 16"):
        llm.generate({"prompt_token_ids": ckpt.prompts[2] * 2}, use_tqdm=False)


def test_a_window_that_is_switched_off_does_not_limit_the_context(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("qwen2").path, tmp_path / "edited")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(use_sliding_window=False, sliding_window=16, max_window_layers=0)  # Qwen2.5's shipped configs
    cfg.pop("layer_types", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert make_llm(path).engine.max_model_len == SMALL["max_position_embeddings"]


def test_tied_embeddings(checkpoints):
    tied, untied = checkpoints("llama_tied"), checkpoints("llama")
    model, _ = load_model(tied.path, "float32", torch.device("cpu"))
    assert model.args.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, tied.hf.get_input_embeddings().weight, rtol=0, atol=0)
    model, _ = load_model(untied.path, "float32", torch.device("cpu"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, untied.hf.lm_head.weight, rtol=0, atol=0)
    ids = tied.prompts[2]
    engine = make_engine(tied.path)
    torch.testing.assert_close(paged_logits(engine, ids, [len(ids)], list(range(8))), hf_logits(tied, ids),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, listed", [("qwen3_bare", None), ("qwen3_bare", "Qwen3ForCausalLM"),
                                          ("llama_bare", None)])
def test_a_bare_decoder_embeds_as_transformers_does(checkpoints, tmp_path, caplog, name, listed):
    """Qwen3-Embedding's checkpoint is a bare Qwen3Model's tensors under a config listing
    Qwen3ForCausalLM; AutoModel's saves list the bare class. Either loads, its vectors transformers'
    last_hidden_state at the last token; one with an untied config gets the embedding as its head, said."""
    ckpt = checkpoints(name)
    path = ckpt.path
    if listed is not None:
        path = copy_checkpoint(ckpt.path, tmp_path / "listed")
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg, "architectures": [listed]}, f)
    llm = LLM(model=path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE)
    assert ("generations mean nothing" in caplog.text) == (name == "llama_bare")
    with torch.no_grad():
        for ids, out in zip(ckpt.prompts, llm.embed([{"prompt_token_ids": p} for p in ckpt.prompts], use_tqdm=False)):
            want = torch.nn.functional.normalize(ckpt.hf(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1)
            assert (torch.tensor(out.outputs.embedding) - want).abs().max() < 1e-4


def with_pooling(src: str, dst, mode: str) -> str:
    """A copy of a checkpoint as a sentence-transformers folder whose Pooling module is `mode`."""
    path = copy_checkpoint(src, dst)
    os.makedirs(os.path.join(path, "1_Pooling"))
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], f)
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, "pooling_mode_cls_token": mode == "cls",
                   "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_lasttoken": False}, f)
    return path


def test_a_mean_pooled_model_embeds_the_mean_of_every_prompt_row(checkpoints, tmp_path, caplog):
    """A sentence-transformers Pooling module of mean tokens: the mean of transformers'
    last_hidden_state over the prompt, though the prompt runs in chunks, beside a generation, and
    again after its blocks were cached (a mean takes no prefix-cache hits: each row is computed)."""
    ckpt = checkpoints("qwen3_bare")
    llm = LLM(model=with_pooling(ckpt.path, tmp_path / "mean", "mean"), dtype="float32", num_kv_blocks=64,
              block_size=BLOCK_SIZE, max_num_batched_tokens=6)
    long = ckpt.prompts[2] + ckpt.prompts[1]
    with torch.no_grad():
        want = [torch.nn.functional.normalize(ckpt.hf(torch.tensor([ids])).last_hidden_state[0].mean(0), dim=-1)
                for ids in (ckpt.prompts[2], long)]
    engine = llm.engine
    engine.add_request("gen", {"prompt_token_ids": ckpt.prompts[2]}, SamplingParams(max_tokens=3, temperature=0))
    for rounds in range(2):  # the second time, every block of both prompts is in the prefix cache
        outs = llm.embed([{"prompt_token_ids": ckpt.prompts[2]}, {"prompt_token_ids": long}], use_tqdm=False)
        for out, w in zip(outs, want):
            assert (torch.tensor(out.outputs.embedding) - w).abs().max() < 1e-4, rounds
    assert outs[1].num_cached_tokens == 0 and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    last = LLM(model=with_pooling(ckpt.path, tmp_path / "forced", "mean"), dtype="float32", num_kv_blocks=64,
               pooling_type="last").embed({"prompt_token_ids": long}, use_tqdm=False)[0].outputs.embedding
    with torch.no_grad():
        at_last = torch.nn.functional.normalize(ckpt.hf(torch.tensor([long])).last_hidden_state[0, -1], dim=-1)
    assert (torch.tensor(last) - at_last).abs().max() < 1e-4
    load_model(with_pooling(ckpt.path, tmp_path / "cls", "cls"), "float32", torch.device("cpu"))
    assert "asks for CLS pooling, which InferLab does not do" in caplog.text
    with pytest.raises(ValueError, match="pooling_type must be one of LAST, MEAN, got 'MAX'"):
        EngineConfig(pooling_type="max")


def test_loading_a_bf16_model_leaves_other_threads_tensors_in_torchs_default_dtype(checkpoints, monkeypatch):
    """torch's default dtype is the process's: a load that set it would make another thread's new
    tensors bf16 meanwhile. The model's own are bf16 all the same."""
    import threading

    from inferlab.model import loader
    seen: dict[str, torch.dtype] = {}

    class Watched(loader.MODELS["llama"]):
        def __init__(self, args):
            other = threading.Thread(target=lambda: seen.update(other=torch.empty(1).dtype))
            other.start()
            other.join()
            seen["default"] = torch.get_default_dtype()
            super().__init__(args)
    monkeypatch.setitem(loader.MODELS, "llama", Watched)
    model, _ = load_model(checkpoints("llama").path, "bfloat16", torch.device("cpu"))
    assert seen == {"other": torch.float32, "default": torch.float32}
    assert model.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("units", ["avx512", "amx"])
def test_fp32_weights_run_as_bf16_in_a_bf16_model_on_bf16_matrix_units(checkpoints, units, monkeypatch):
    """Those units multiply bf16, so a bf16 model there keeps an fp32 checkpoint's matrices, the tied
    vocabulary included, as the checkpoint's values rounded once to bf16 (as vLLM's dtype does); an
    fp32 model keeps them as stored."""
    from inferlab import kernels
    from inferlab.model.layers import quant
    try:
        native = kernels.for_isa(units)
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    monkeypatch.setattr(kernels, "native", lambda: native)
    tied = checkpoints("llama_tied")
    bf16, _ = load_model(tied.path, "bfloat16", torch.device("cpu"))
    fp32, _ = load_model(tied.path, "float32", torch.device("cpu"))
    from inferlab.model.layers import regroup
    kept = quant.BF16X16 if units == "avx512" else quant.BF16  # in pair rows without AMX (keep.target_type)

    def weights(m):
        return regroup.unrepack(m.weight, m.wtype) if m.wtype == quant.BF16X16 else m.weight
    qkv = bf16.model.layers[0].self_attn.qkv_proj
    assert qkv.wtype == kept and fp32.model.layers[0].self_attn.qkv_proj.wtype == quant.F32
    assert torch.equal(weights(qkv), fp32.model.layers[0].self_attn.qkv_proj.weight.bfloat16())
    assert bf16.model.embed_tokens.wtype == kept and bf16.lm_head.weight is bf16.model.embed_tokens.weight
    assert torch.equal(weights(bf16.model.embed_tokens), tied.hf.get_input_embeddings().weight.bfloat16())


def test_tokenizer_matches_transformers(checkpoints):
    ckpt = checkpoints("qwen2")
    _, tok = load_model(ckpt.path, "float32", torch.device("cpu"))
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(ckpt.path)
    for text in [*CORPUS, "héllo wörld 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token_ids == {ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


# --- errors -----------------------------------------------------------------------------------

def copy_checkpoint(src: str, dst, skip: tuple[str, ...] = ()) -> str:
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f not in skip:
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    return str(dst)


def load_error(path: str) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(path, "float32", torch.device("cpu"))
    assert isinstance(e.value, ValueError)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_error_missing_path(tmp_path):
    assert "does not exist" in load_error(str(tmp_path / "nope"))


def test_error_unsupported_architecture(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "gpt2")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    message = load_error(path)
    assert "GPT2LMHeadModel" in message and "unsupported" in message


def test_a_config_without_architectures_loads_by_its_model_type(checkpoints, tmp_path):
    """As transformers' Auto classes do; with neither, the error names what it found."""
    path = copy_checkpoint(checkpoints("qwen2").path, tmp_path / "bare")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    del cfg["architectures"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    model, _ = load_model(path, "float32", torch.device("cpu"))
    assert model.args.arch == "qwen2" and model.args.attention_bias
    cfg["model_type"] = "gpt2"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert "unsupported architecture gpt2" in load_error(path)


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3}, "unsupported config: num_key_value_heads=3 (it must divide num_attention_heads=4)"),
    ({"num_hidden_layers": 0}, "unsupported config: num_hidden_layers=0 (a positive integer)"),
    ({"rms_norm_eps": float("nan")}, "unsupported config: rms_norm_eps=nan (a number in [0, 1))"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 scaling needs factor, low_freq_factor, "
     "high_freq_factor, original_max_position_embeddings; it lacks low_freq_factor, high_freq_factor, "
     "original_max_position_embeddings"),
])
def test_a_config_error_names_the_config_json_key(checkpoints, tmp_path, change, message):
    """Not ModelArgs' own names (num_kv_heads), nor a KeyError from deep in the rotary layer."""
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "bad")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, **change}, f)
    assert message in load_error(path)


def test_error_no_safetensors(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "empty", skip=("model.safetensors",))
    assert "safetensors" in load_error(path)


def test_error_no_tokenizer(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "notok", skip=("tokenizer.json",))
    assert "tokenizer.json" in load_error(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_safetensors(checkpoints, tmp_path, damage):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / damage)
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(os.urandom(1000) if damage == "garbage" else data[:len(data) // 2])
    assert "model.safetensors" in load_error(path)


@pytest.mark.parametrize("content", [b"not a gguf file at all" * 10, b"GGUF\x03\x00\x00\x00\x05"],
                         ids=["garbage", "truncated"])
def test_error_corrupt_gguf(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    message = load_error(str(path))
    assert "GGUF" in message and "x.gguf" in message


@pytest.mark.parametrize("victim", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                    "model.norm.weight"])
def test_error_missing_tensor(checkpoints, tmp_path, victim):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "missing")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors[victim]
    save_file(tensors, file, metadata={"format": "pt"})
    message = load_error(path)
    assert "missing" in message and victim in message


def test_error_unexpected_and_misshapen_tensor(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "extra")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    save_file({**tensors, "model.layers.0.mystery.weight": torch.zeros(3)}, file)
    assert "model.layers.0.mystery.weight" in load_error(path)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, file)
    message = load_error(path)
    assert "model.norm.weight" in message and "(65,)" in message


def test_the_files_an_index_names_are_the_checkpoint(checkpoints, tmp_path):
    """Sharded with an index, beside Mistral's consolidated.safetensors (the same weights under its own
    names, as Mistral's folders ship them): the index's files load; a file it names that is not there
    is named."""
    src = checkpoints("llama")
    path = copy_checkpoint(src.path, tmp_path / "sharded", skip=("model.safetensors",))
    tensors = load_file(os.path.join(src.path, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(path, file), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, os.path.join(path, "consolidated.safetensors"))
    model, _ = load_model(path, "float32", torch.device("cpu"))
    torch.testing.assert_close(model.model.norm.weight, tensors["model.norm.weight"], rtol=0, atol=0)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    assert "lacks model-00002-of-00002.safetensors, which its model.safetensors.index.json names" in load_error(path)


def test_load_errors_name_the_checkpoints_tensor_and_file(checkpoints, tmp_path, caplog):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "bad")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file({**tensors, "model.layers.0.self_attn.k_proj.weight": k[: k.shape[0] // 2]}, file)
    # the checkpoint's name, not the fused qkv_proj it loads into
    assert load_error(path).startswith("tensor 'model.layers.0.self_attn.k_proj.weight': shard 1 has")
    save_file(tensors, file)
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, "w") as f:
        f.write('{"architectures": ["LlamaForCausalLM"],\n}')
    assert load_error(path).startswith(f"{cfg_file} is not valid JSON")
    assert load_error(" ") == "the model path is empty (leave the option out for the embedded model)"


def test_a_tied_config_over_a_distinct_head_says_the_head_is_left_out(checkpoints, tmp_path, caplog):
    path = copy_checkpoint(checkpoints("llama").path, tmp_path / "flipped")  # untied weights, tied config
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "tie_word_embeddings": True}, f)
    with caplog.at_level("WARNING", logger="inferlab"):
        model, _ = load_model(path, "float32", torch.device("cpu"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "the checkpoint's lm_head.weight differs from its embedding, but config.json ties them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="inferlab"):
        load_model(checkpoints("llama_tied").path, "float32", torch.device("cpu"))
    assert "lm_head.weight" not in caplog.text


def test_cli_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "inferlab.cli", "generate", "--model", "/nonexistent", "hi"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent" in lines[0], proc.stderr
    assert proc.stdout == ""
