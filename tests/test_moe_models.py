"""Mixture-of-experts and MLA checkpoints (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3) against
transformers' own classes, on tiny random checkpoints built here with `save_pretrained`, and as GGUF
files written here the way llama.cpp's converter writes them.

Each config exercises a different corner: dense layers among sparse ones (mlp_only_layers,
decoder_sparse_step, first_k_dense_replace), softmax top-k with and without renormalisation, a
gated shared expert, DeepSeek-V2's group-limited routing without a q LoRA and with YaRN's mscale,
V3's sigmoid routing with e_score_correction_bias, groups and routed_scaling_factor with a q LoRA,
and Qwen3-MoE with YaRN. Every weight is random (norms, biases and the correction bias included).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_hf_models import (  # noqa: F401 - one_thread: the autouse fixture, for this module too
    BLOCK_SIZE,
    CHAT_TEMPLATE,
    CORPUS,
    Checkpoint,
    build_checkpoint,
    copy_checkpoint,
    hf_logits,
    lazily,
    load_error,
    one_thread,
    paged_logits,
    train_tokenizer,
)

from inferlab import LLM, EngineConfig, LLMEngine, SamplingParams
from inferlab.kv_pool import kv_bytes_per_block
from inferlab.model.loader import load_model

NEW_TOKENS = 12
TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6, num_experts_per_tok=2)
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, num_key_value_heads=4,
           n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
SPECS = {  # name -> (config class, model class, overrides)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_key_value_heads=2, num_experts=8, shared_expert_intermediate_size=48, mlp_only_layers=[1],
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_key_value_heads=2, head_dim=32, num_experts=8, norm_topk_prob=True, decoder_sparse_step=2,
                       rope_parameters={**YARN, "rope_theta": 10000.0})),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(**MLA, q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                         rope_parameters={**YARN, "rope_theta": 10000.0, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(**MLA, q_lora_rank=48, routed_scaling_factor=2.5, norm_topk_prob=True)),
}


@dataclass
class MoECheckpoint(Checkpoint):
    expected: list[list[int]] | None = None

    @torch.no_grad()
    def greedy(self) -> list[list[int]]:
        """transformers' greedy continuation of each prompt, EOS included (as ignore_eos does; generate's
        min_new_tokens would ban it instead): its argmax, one whole forward per token. Computed once."""
        if self.expected is None:
            self.expected = []
            for p in self.prompts:
                ids = list(p)
                for _ in range(NEW_TOKENS):
                    ids.append(int(self.hf(torch.tensor([ids])).logits[0, -1].argmax()))
                self.expected.append(ids[len(p):])
        return self.expected


def build(name: str, path: str, tok) -> MoECheckpoint:
    ckpt = build_checkpoint(name, path, tok, SPECS[name], TINY)
    ids = tok.encode(" ".join(CORPUS)).ids
    # three prompts of different lengths; the third shares the second's first 9 tokens (prefix cache)
    return MoECheckpoint(name, path, ckpt.hf, [ids[:3], ids[10:19], ids[10:19] + ids[40:47]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    return lazily(lambda name, path: build(name, path, tokenizer), tmp_path_factory)


@pytest.fixture(scope="module", params=list(SPECS))
def ckpt(request, checkpoints) -> MoECheckpoint:
    return checkpoints(request.param)


def engine_for(path: str, **kwargs) -> LLMEngine:
    kwargs = {"num_kv_blocks": 64, **kwargs}
    return LLMEngine(EngineConfig(model=path, dtype="float32", block_size=BLOCK_SIZE, **kwargs))


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# --- parity ---------------------------------------------------------------------------------------

def test_configs_build_what_they_say(checkpoints):
    """The configs really have the structure the parity tests claim to cover."""
    layers = {name: load_model(checkpoints(name).path, "float32", torch.device("cpu"))[0].model.layers
              for name in SPECS}
    kinds = {name: [type(layer.mlp).__name__ for layer in ls] for name, ls in layers.items()}
    assert kinds["qwen2_moe"] == ["SparseMoeBlock", "MLP", "SparseMoeBlock"]
    assert kinds["qwen3_moe"] == ["MLP", "SparseMoeBlock", "MLP"]
    assert kinds["deepseek_v2"] == kinds["deepseek_v3"] == ["MLP", "DeepseekMoE", "DeepseekMoE"]
    assert layers["qwen2_moe"][0].mlp.shared_expert is not None and layers["qwen3_moe"][1].mlp.shared_expert is None
    v2, v3 = layers["deepseek_v2"][1], layers["deepseek_v3"][1]
    assert v2.self_attn.q_b_proj is None and v3.self_attn.q_b_proj is not None
    assert v2.mlp.gate.routing.group_score == "max" and v2.mlp.gate.e_score_correction_bias is None
    assert v3.mlp.gate.routing.scoring == "sigmoid" and v3.mlp.gate.e_score_correction_bias.abs().min() > 0


@pytest.mark.parametrize("chunks", [[16, 1, 1, 1], [5, 11, 1, 1, 1], [16, 3]], ids=["prefill", "chunked", "cached"])
def test_logits_parity(ckpt, chunks):
    """Prefill, chunked prefill (reading the cache) and decode steps all give transformers' logits."""
    ids = ckpt.prompts[2] + ckpt.prompts[0]
    expected = hf_logits(ckpt, ids)
    assert expected.std() > 1
    engine = engine_for(ckpt.path)
    torch.testing.assert_close(paged_logits(engine, ids, chunks, [9, 2, 17, 5, 30]), expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_parity(ckpt):
    """Greedy output equals transformers' generate token for token: alone, batched (the third prompt
    hitting the second's cached prefix), in tiny steps mixing prefill chunks with decodes, and in a
    pool so small that requests are preempted, recomputed or swapped out and back."""
    expected = ckpt.greedy()
    assert len({tuple(e) for e in expected}) == 3
    llm = LLM(model=ckpt.path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE)
    assert [generate(llm, [p])[0] for p in ckpt.prompts] == expected
    engine = llm.engine
    assert generate(llm, ckpt.prompts) == expected
    hits = engine.block_manager.snapshot()
    assert hits["prefix_hits"] > 0, hits
    chunky = LLM(loaded=(engine.model, engine.tokenizer), num_kv_blocks=64, block_size=BLOCK_SIZE,
                 max_num_batched_tokens=6, enable_prefix_caching=False)
    assert generate(chunky, ckpt.prompts) == expected
    for mode in ("recompute", "swap"):  # swap: the victim's latent (or K/V) blocks go to host memory and back
        tight = LLM(loaded=(engine.model, engine.tokenizer), num_kv_blocks=9, block_size=BLOCK_SIZE,
                    preemption_mode=mode, prefix_cache="radix" if mode == "swap" else "hash")
        assert generate(tight, ckpt.prompts) == expected, mode
        assert tight.engine.scheduler.num_preemptions > 0
        tight.engine.check_integrity()
        assert tight.engine.block_manager.snapshot()["usage"] == 0


def test_torch_attention_backend(checkpoints):
    """The PyTorch reference plan (decode rows batched, every chunk through SDPA) gives the same tokens."""
    ckpt = checkpoints("deepseek_v3")
    llm = LLM(model=ckpt.path, dtype="float32", num_kv_blocks=64, block_size=BLOCK_SIZE, attention_backend="torch")
    assert generate(llm, ckpt.prompts) == ckpt.greedy()


def test_mla_pool_holds_the_latent(checkpoints):
    """The pool is sized from the latent: one (kv_lora_rank + qk_rope_head_dim) row per token and layer
    for MLA, K and V of every KV head for the rest."""
    mla, gqa = engine_for(checkpoints("deepseek_v3").path), engine_for(checkpoints("qwen2_moe").path)
    assert mla.runner.kv_cache.shape == (1, 3, 64, BLOCK_SIZE, 1, 32 + 16)
    assert gqa.runner.kv_cache.shape == (2, 3, 64, BLOCK_SIZE, 2, 16)
    for engine in (mla, gqa):
        cache = engine.runner.kv_cache
        assert cache.numel() * cache.element_size() == 64 * kv_bytes_per_block(engine.model.args, BLOCK_SIZE,
                                                                                  torch.float32)


# --- GGUF -----------------------------------------------------------------------------------------
# Written as llama.cpp's convert_hf_to_gguf.py writes these architectures: experts stacked into one
# 3-D tensor per projection, kv_b_proj split per head into k_b (transposed) and v_b, the shared
# expert's gate as one row, DeepSeek's latent as an MQA "head" of kv_lora_rank + rope width.

HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.q_a_proj": "attn_q_a",
              "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
              "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
              "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
              "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
              "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}


def gguf_tensors(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (as saved: one matrix per expert) under llama.cpp's names and layouts."""
    cfg, state, out = ckpt.hf.config, load_file(os.path.join(ckpt.path, "model.safetensors")), {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        t = t.float()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            path, suffix = rest.rsplit(".", 1)
            if ".experts." in path:  # mlp.experts.<e>.<proj>
                _, _, e, proj = path.split(".")
                experts.setdefault(f"blk.{layer}.ffn_{proj[:-5]}_exps.weight", {})[int(e)] = t
            elif path == "self_attn.kv_b_proj":
                kv_b = t.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
                out[f"blk.{layer}.attn_k_b.weight"] = kv_b[:, :cfg.qk_nope_head_dim].transpose(1, 2)
                out[f"blk.{layer}.attn_v_b.weight"] = kv_b[:, cfg.qk_nope_head_dim:]
            elif suffix == "e_score_correction_bias":
                out[f"blk.{layer}.exp_probs_b.bias"] = t
            else:
                out[f"blk.{layer}.{HF_TO_GGUF[path]}.{suffix}"] = t
    for name, per_expert in experts.items():
        out[name] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return {name: t.contiguous().numpy() for name, t in out.items()}


def write_gguf(ckpt: Checkpoint, tok, path: str, quantize: bool = False) -> str:
    import gguf
    name, cfg = ckpt.name, ckpt.hf.config
    arch = GGUF_ARCH[name]
    w = gguf.GGUFWriter(path, arch)
    u32, f32 = (lambda k, v: w.add_uint32(f"{arch}.{k}", v)), (lambda k, v: w.add_float32(f"{arch}.{k}", v))
    u32("block_count", cfg.num_hidden_layers)
    u32("context_length", cfg.max_position_embeddings)
    u32("embedding_length", cfg.hidden_size)
    u32("feed_forward_length", cfg.intermediate_size)
    u32("attention.head_count", cfg.num_attention_heads)
    f32("rope.freq_base", cfg.rope_parameters["rope_theta"])
    f32("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    u32("vocab_size", cfg.vocab_size)
    u32("expert_count", cfg.n_routed_experts if arch == "deepseek2" else cfg.num_experts)
    u32("expert_used_count", cfg.num_experts_per_tok)
    u32("expert_feed_forward_length", cfg.moe_intermediate_size)
    rope = cfg.rope_parameters
    if rope["rope_type"] == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        f32("rope.scaling.factor", rope["factor"])
        u32("rope.scaling.original_context_length", rope["original_max_position_embeddings"])
        if rope.get("mscale_all_dim"):
            f32("rope.scaling.yarn_log_multiplier", 0.1 * rope["mscale_all_dim"])
    if arch == "deepseek2":
        r, rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        u32("attention.head_count_kv", 1)
        u32("attention.key_length", r + rope_dim)
        u32("attention.value_length", r)
        u32("attention.key_length_mla", cfg.qk_nope_head_dim + rope_dim)
        u32("attention.value_length_mla", cfg.v_head_dim)
        u32("attention.kv_lora_rank", r)
        if cfg.q_lora_rank:
            u32("attention.q_lora_rank", cfg.q_lora_rank)
        u32("rope.dimension_count", rope_dim)
        u32("leading_dense_block_count", cfg.first_k_dense_replace)
        u32("expert_shared_count", cfg.n_shared_experts)
        f32("expert_weights_scale", cfg.routed_scaling_factor)
        if cfg.norm_topk_prob and name == "deepseek_v3":
            w.add_bool(f"{arch}.expert_weights_norm", True)
        u32("expert_gating_func", 2 if name == "deepseek_v3" else 1)
        u32("expert_group_count", cfg.n_group)
        u32("expert_group_used_count", cfg.topk_group)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        u32("attention.head_count_kv", cfg.num_key_value_heads)
        u32("attention.key_length", head_dim)
        u32("attention.value_length", head_dim)
        if arch == "qwen2moe":
            u32("expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    for tname, data in gguf_tensors(ckpt).items():
        # quantized where InferLab's q8_0 mode would quantize (its Linear layers), so the two can be compared
        kept_float = data.ndim == 1 or data.shape[-1] % 32 or "ffn_gate_inp." in tname or "attn_k_b" in tname \
            or "attn_v_b" in tname
        if quantize and not kept_float:
            data = data.reshape(1, -1) if tname.endswith("ffn_gate_inp_shexp.weight") else data
            w.add_tensor(tname, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(tname, data.reshape(-1) if tname.endswith("ffn_gate_inp_shexp.weight") else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(checkpoints, tokenizer, tmp_path_factory):
    written: dict[tuple[str, bool], str] = {}

    def get(name: str, quantize: bool = False) -> str:
        if (name, quantize) not in written:
            path = str(tmp_path_factory.mktemp("gguf") / f"{name}{'-q8_0' if quantize else ''}.gguf")
            written[name, quantize] = write_gguf(checkpoints(name), tokenizer, path, quantize)
        return written[name, quantize]
    return get


@pytest.fixture(autouse=True)
def no_model_cache(monkeypatch):
    monkeypatch.setenv("INFERLAB_MODEL_CACHE", "0")


@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_matches_transformers(name, checkpoints, gguf_file):
    """A GGUF file of each architecture: transformers' logits, and its greedy tokens batched."""
    ckpt = checkpoints(name)
    path = gguf_file(name)
    ids = ckpt.prompts[2] + ckpt.prompts[0]
    engine = engine_for(path)
    assert type(engine.model.args) is type(load_model(ckpt.path, "float32", torch.device("cpu"))[0].args)
    torch.testing.assert_close(paged_logits(engine, ids, [16, 1, 1, 1], list(range(8))), hf_logits(ckpt, ids),
                               atol=1e-4, rtol=1e-4)
    llm = LLM(loaded=(engine.model, engine.tokenizer), num_kv_blocks=64, block_size=BLOCK_SIZE)
    assert generate(llm, ckpt.prompts) == ckpt.greedy()


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_quantized_gguf_keeps_its_blocks(name, checkpoints, gguf_file, monkeypatch, tmp_path):
    """A q8_0 file runs from its blocks (experts split from the 3-D tensors included) and equals the HF
    folder quantized to q8_0 at load: byte-identical weights. A second load comes from the cache."""
    path = gguf_file(name, quantize=True)
    model, _ = load_model(path, "float32", torch.device("cpu"))
    expert = model.model.layers[2].mlp.experts[3].gate_up_proj
    assert (expert.wtype.base or expert.wtype).name == "q8_0" and expert.weight.dtype == torch.uint8  # x16 on AVX-512
    reference, _ = load_model(checkpoints(name).path, "float32", torch.device("cpu"), quantization="q8_0")
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), n

    from inferlab.model import gguf_file
    monkeypatch.setenv("INFERLAB_MODEL_CACHE", "1")
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path))  # the kernels are loaded already: only models go there
    load_model(path, "float32", torch.device("cpu"))
    monkeypatch.setattr(gguf_file, "parse", lambda *a: pytest.fail("a cached file must not be parsed again"))
    cached, _ = load_model(path, "float32", torch.device("cpu"))
    assert cached.args == model.args
    for (n, a), (_, b) in zip(model.named_parameters(), cached.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_gguf_writer_agrees_with_transformers_reader(name, checkpoints, gguf_file):
    """transformers reads qwen2moe / qwen3moe GGUF tensors itself: every tensor it maps comes back as
    the checkpoint has it, so the layouts the loader is tested against are llama.cpp's, not only ours.
    (Its reader knows too few of the MoE keys to size a model this small, so it gets the config, and
    it has no names for dense layers among sparse ones, so those are left out.)"""
    path, ckpt = gguf_file(name), checkpoints(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               config=ckpt.hf.config, dtype=torch.float32).state_dict()
    dense = tuple(f"model.layers.{i}.mlp." for i, layer in enumerate(ckpt.hf.model.layers)
                  if not hasattr(layer.mlp, "experts"))
    checked = [k for k in ckpt.hf.state_dict() if not k.startswith(dense)]
    assert any("experts" in k for k in checked) and any("q_proj" in k for k in checked)
    for key in checked:
        torch.testing.assert_close(theirs[key], ckpt.hf.state_dict()[key], rtol=0, atol=0, msg=key)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, field, value", [
    ("deepseek_v2", "norm_topk_prob", True),
    ("deepseek_v2", "topk_method", "noaux_tc"),
    ("deepseek_v2", "moe_layer_freq", 2),
    ("deepseek_v3", "scoring_func", "softmax"),
    ("deepseek_v3", "n_group", 3),
    ("deepseek_v3", "attention_bias", True),
    ("deepseek_v3", "quantization_config", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    ("qwen3_moe", "hidden_act", "gelu"),
    ("qwen3_moe", "attention_bias", True),
    ("qwen3_moe", "decoder_sparse_step", 0),  # was a ZeroDivisionError
    ("qwen2_moe", "num_experts_per_tok", 0),  # these ran with no experts, or fewer or more than asked
    ("qwen3_moe", "num_experts_per_tok", -1),
    ("qwen2_moe", "num_experts_per_tok", 99),
    ("deepseek_v3", "num_experts_per_tok", 99),  # named topk_group
    ("qwen3_moe", "num_experts_per_tok", "2"),
])
def test_unsupported_config_is_one_line_naming_the_field(name, field, value, checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints(name).path, tmp_path / "edited")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg[field] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    message = load_error(path)
    assert field in message and "unsupported" in message, message


def test_only_v3_leaves_out_a_layer_past_num_hidden_layers(checkpoints, tmp_path):
    """V3's checkpoints append their multi-token-prediction layer, which is not run; a V2 config with
    fewer layers than its weights is a mismatch, refused as Llama's or Qwen's is (it ran without a layer)."""
    for name in ("deepseek_v2", "deepseek_v3"):
        path = copy_checkpoint(checkpoints(name).path, tmp_path / name)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] - 1}, f)
        if name == "deepseek_v2":
            assert "unexpected tensor 'model.layers.2." in load_error(path)
        else:
            assert len(load_model(path, "float32", torch.device("cpu"))[0].model.layers) == 2


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(name, checkpoints):
    """bf16 (the default on CPUs with bf16 units): routers in fp32, MLA's absorbed products in bf16;
    no further from the fp32 model than transformers' own bf16 forward."""
    ckpt = checkpoints(name)
    ids = ckpt.prompts[2] + ckpt.prompts[0]
    reference = hf_logits(ckpt, ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs_error = (theirs(torch.tensor([ids])).logits[0].float() - reference).abs().mean()
    engine = LLMEngine(EngineConfig(model=ckpt.path, dtype="bfloat16", num_kv_blocks=64, block_size=BLOCK_SIZE))
    ours = paged_logits(engine, ids, [16, 1, 1, 1], list(range(8))).float()
    assert (ours - reference).abs().mean() < 1.5 * theirs_error
