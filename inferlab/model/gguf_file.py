"""Read a GGUF file: the model's shape, its tensors as stored under checkpoint (HF) names, and the
tokenizer's fields (with a reranker's: its head's labels and llama.cpp's pooling type).

A quantized tensor stays its raw blocks (uint8 rows) tagged with its `quant.WeightType`; the
loader streams them into the model's `weight_loader`s. Two of llama.cpp's layouts are undone here
so that every model class sees HF's: the interleaved rotary rows of Llama's Q and K, and MLA's
per-head split of kv_b_proj.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from inferlab.model import weight_cache
from inferlab.model.base import CausalLM, ModelArgs, ModelLoadError
from inferlab.model.deepseek import DeepseekForCausalLM
from inferlab.model.gguf_reader import CutShort, GGUFFile
from inferlab.model.layers import quant
from inferlab.model.llama import LlamaForCausalLM
from inferlab.model.qwen_moe import QwenMoeForCausalLM

# a GGUF file's general.architecture -> the class that reads its fields
GGUF_ARCHS: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM,
    "qwen2moe": QwenMoeForCausalLM, "qwen3moe": QwenMoeForCausalLM, "deepseek2": DeepseekForCausalLM}
GGUF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj",
              # mixture of experts: the router, the experts (3-D: one matrix per expert), the shared ones
              "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
              "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
              "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
              "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
              # multi-head latent attention (attn_k_b / attn_v_b: kv_b split per head, joined back on load)
              "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
              "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
              "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
              "attn_k_b": "self_attn.k_b_proj", "attn_v_b": "self_attn.v_b_proj"}


# a classification head's fields, under `{arch}.` in the file (llama.cpp's; a Qwen3-Reranker's converter
# writes them), kept without that prefix beside the tokenizer's
HEAD_FIELDS = ("pooling_type", "classifier.output_labels")
# llama.cpp's pooling types (LLAMA_POOLING_TYPE_*) by vLLM's names; RANK: a reranker's head reads the last row
POOLING = {1: "MEAN", 2: "CLS", 3: "LAST", 4: "LAST"}


def parse(path: str) -> tuple[ModelArgs, weight_cache.Tensors, dict]:
    """The model's shape, its tensors as stored (checkpoint names, llama.cpp's RoPE row order undone;
    a reranker's cls.output as score.weight) and the tokenizer's and head's fields."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"cannot read GGUF file {path}: " + (
                "it is empty" if size == 0 else "it does not start with GGUF's magic bytes"))
    cut = (f"cannot read GGUF file {path}: it is cut short at {size:,} bytes, before the end of what its header "
           "describes (an interrupted download or copy?)")
    if size < 24:  # magic, version, tensor and field counts
        raise ModelLoadError(cut)
    try:
        reader = GGUFFile(path)
    except CutShort:
        raise ModelLoadError(cut) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None
    fields = reader.fields
    if fields.get("split.count", 1) > 1:
        raise ModelLoadError(f"{path} is part {fields.get('split.no', 0) + 1} of {fields['split.count']} of a split "
                             "GGUF: merge the parts into one file first (llama.cpp's `llama-gguf-split --merge`)")
    if "tokenizer.ggml.tokens" not in fields:
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.ggml.tokens): the vocabulary must be in the file")
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    model_class = GGUF_ARCHS[arch]
    _check_layers(fields.get(f"{arch}.block_count"), reader.tensors)
    args = model_class.args_from_gguf(arch, fields, {t.name for t in reader.tensors})
    names = {**GGUF_NAMES, **model_class.gguf_names}
    tensors, readable = [], set()  # readable: the types gguf's numpy code was seen to dequantize
    for t in reader.tensors:
        wtype = quant.BY_CODE.get(t.type_code)
        if wtype is None:
            known = ", ".join(w.name for w in (*quant.TYPES, *quant.DEQUANTIZED_AT_LOAD))
            raise ModelLoadError(f"tensor {t.name!r} has type {ggml_type_name(t.type_code)}, which InferLab cannot "
                                 f"read; supported: {known}")
        if not wtype.native and wtype not in readable:  # fail here, naming the tensor, if gguf cannot read it
            try:  # one block is enough to tell
                quant.dequantize(torch.from_numpy(np.array(t.data.reshape(-1)[:wtype.nbytes]).reshape(1, -1)), wtype)
            except ValueError as e:
                raise ModelLoadError(f"tensor {t.name!r}: {e}") from None
            readable.add(wtype)
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= args.num_layers:
            continue  # a multi-token-prediction block after the decoder's layers
        if t.name == "rope_freqs.weight":  # Llama 3.1+'s RoPE scaling, as llama.cpp's converter writes it
            args.rope_scaling = _freq_factors(args, np.array(t.data, dtype=np.float32).reshape(-1))
            continue
        data = np.array(t.data)  # a copy: the reader's arrays are read-only views of the file
        w = torch.from_numpy(data.view(np.int16) if wtype == quant.BF16 else data)
        w = w.view(torch.bfloat16) if wtype == quant.BF16 else w
        name = _checkpoint_name(t.name, names)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves rotary pairs in Q/K rows; undo it for rotate-half RoPE (whole rows move)
            n = args.num_heads if "q_proj" in name else args.num_kv_heads
            w = w.view(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        if ".experts." in name:  # [experts, rows, row] -> one matrix per expert, as HF checkpoints store them
            layer, proj = name.split(".mlp.experts.")
            tensors += [(f"{layer}.mlp.experts.{e}.{proj}", w[e].clone(), wtype) for e in range(w.shape[0])]
            continue
        tensors.append((name, w.view(1, -1) if name.endswith("shared_expert_gate.weight") else w, wtype))
    head = {k: fields[f"{arch}.{k}"] for k in HEAD_FIELDS if f"{arch}.{k}" in fields}
    return args, _join_kv_b(tensors), {k: v for k, v in fields.items() if k.startswith("tokenizer.")} | head


def ggml_type_name(code: int) -> str:
    """ggml's name of a type number (the gguf package's table), or the number where it has none."""
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(code).name
    except ValueError:
        return f"number {code}"


def _check_layers(block_count, tensors) -> None:
    """block_count against the layers whose tensors the file holds: a model built from a wrong count
    ran without some of them, or (a count of millions) took the memory to build them all."""
    held = {int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")}
    if held != set(range(block_count if isinstance(block_count, int) else -1)):
        raise ModelLoadError(f"block_count is {block_count!r}, but the file holds tensors for "
                             f"{len(held)} layers (blk.{min(held, default=0)} to blk.{max(held, default=0)})")


def _freq_factors(args: ModelArgs, factors: np.ndarray) -> dict:
    """`rope_freqs.weight`: a divisor per rotary frequency (llama.cpp's freq_factors), which is how its
    converter stores Llama 3.1's scaling; the file then has no rope.scaling keys of its own."""
    if args.rope_scaling is not None:
        raise ModelLoadError(f"the file has both rope_freqs.weight and RoPE scaling {args.rope_scaling}")
    if factors.size != args.head_dim // 2:
        raise ModelLoadError(f"rope_freqs.weight has {factors.size} factors; RoPE of head_dim {args.head_dim} "
                             f"rotates {args.head_dim // 2} frequencies")
    return {"rope_type": "freq_factors", "factors": factors.tolist()}


def _join_kv_b(tensors: weight_cache.Tensors) -> weight_cache.Tensors:
    """llama.cpp's MLA files split kv_b_proj per head into k_b ([heads, rank, nope], transposed for its
    absorbed matmul) and v_b ([heads, v, rank]); join them back into HF's kv_b_proj, in fp32."""
    parts = {name: (w, wtype) for name, w, wtype in tensors if name.endswith(("k_b_proj.weight", "v_b_proj.weight"))}
    out = [entry for entry in tensors if entry[0] not in parts]
    for name in [n for n in parts if n.endswith("k_b_proj.weight")]:
        (k_b, k_type), (v_b, v_type) = parts[name], parts[name.replace("k_b_proj", "v_b_proj")]
        heads = k_b.shape[0]
        k = quant.dequantize(k_b.reshape(-1, k_b.shape[-1]), k_type).view(heads, k_b.shape[1], -1)
        v = quant.dequantize(v_b.reshape(-1, v_b.shape[-1]), v_type).view(heads, v_b.shape[1], -1)
        kv_b = torch.cat([k.transpose(1, 2), v], dim=1).reshape(-1, k.shape[1])
        out.append((name.replace("k_b_proj", "kv_b_proj"), kv_b.contiguous(), quant.F32))
    return out


def _checkpoint_name(name: str, names: dict[str, str]) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name == "cls.output.weight":  # a decoder's classification head (Qwen3-Reranker's yes and no rows)
        return "score.weight"
    if name.startswith("cls."):
        raise ModelLoadError(f"GGUF tensor {name!r}: a classification head with more than one matrix (an "
                             "encoder's, such as BERT rerankers') is not supported; a decoder's cls.output is")
    parts = name.split(".")  # blk.N.<kind>.<weight|bias>
    if parts[0] != "blk" or parts[2] not in names:
        raise ModelLoadError(f"unexpected GGUF tensor {name!r}")
    if parts[2] == "exp_probs_b":  # DeepSeek-V3's e_score_correction_bias, stored as the router's bias
        return f"model.layers.{parts[1]}.mlp.gate.e_score_correction_bias"
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
