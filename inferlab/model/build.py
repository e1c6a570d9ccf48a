"""Build a model from a stream of checkpoint tensors (name, tensor as stored, block type): each goes
to its parameter's `weight_loader` (into a merged layer's shard where the model packs several), a
tensor the model has no place for or a parameter no tensor fills is one `ModelLoadError`, and then
`quantization` decides what each weight is kept as (`CausalLM.process_weights_after_loading`).
loader.py finds and reads the checkpoints."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from inferlab import kernels
from inferlab.model.base import CausalLM, ModelArgs, ModelLoadError
from inferlab.model.deepseek import DeepseekForCausalLM
from inferlab.model.default_dtype import default_dtype
from inferlab.model.layers import quant
from inferlab.model.llama import LlamaForCausalLM
from inferlab.model.qwen_moe import QwenMoeForCausalLM

log = logging.getLogger("inferlab")

# our name for an architecture -> the class that builds it
MODELS: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM,
    "qwen2_moe": QwenMoeForCausalLM, "qwen3_moe": QwenMoeForCausalLM,
    "deepseek_v2": DeepseekForCausalLM, "deepseek_v3": DeepseekForCausalLM}
Weights = Iterator[tuple[str, torch.Tensor, quant.WeightType | None]]  # (name, tensor as stored, block type)


def _construct(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> CausalLM:
    with default_dtype(dtype), torch.device(device):
        model = MODELS[args.arch](args)
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.float()  # RoPE frequencies stay fp32
    return model


def build(args: ModelArgs, weights: Weights, dtype: torch.dtype, device: torch.device, quantization: str,
          int8_activations: bool) -> CausalLM:
    model = _construct(args, dtype, device)
    packed = type(model).packed_modules
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    head = None
    for source, tensor, wtype in weights:
        if args.tie_word_embeddings and source == "lm_head.weight":
            head = (tensor, wtype)  # compared with the embedding below
        if model.skip_checkpoint_tensor(source):
            continue
        name, shard = source, None
        for proj, (fused, idx) in packed.items():
            if f".{proj}." in name:
                name, shard = name.replace(f".{proj}.", f".{fused}."), idx
                break
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"unexpected tensor {source!r} in checkpoint")
        loader = getattr(param, "weight_loader", None)
        try:
            if loader is not None:  # a linear or embedding weight, or a merged layer's bias: as stored
                _check_row_length(param, tensor, wtype)
                loader(param, tensor, shard, wtype)
            else:  # kept in the model's dtype (norms, routers, MLA's up-projection): block types dequantized
                value = quant.dequantize(tensor, wtype) if wtype is not None and wtype.dtype is None else tensor
                if param.shape != value.shape:
                    raise ValueError(f"has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.data.copy_(value)
        except (ValueError, RuntimeError) as e:  # the checkpoint's name, not the fused one it loads into
            raise ModelLoadError(f"tensor {source!r}: {e}") from None
        loaded.add(f"{name}#{shard}")
    _warn_if_head_differs(model, head)
    expected = {f"{n}#{s}" for n, _ in params.items() for s in _shards(n, packed)}
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight#None")
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor{'s' * (len(missing) > 1)}, e.g. "
                             f"{_checkpoint_name(missing[0], packed)}")
    native = kernels.native() if device.type == "cpu" else None
    # a dtype no kernel takes (float16) runs PyTorch's ops: weights in its dtype, not blocks that
    # each op would dequantize anew
    isa = native.isa if native and model.dtype in kernels.DTYPE_CODES else None
    model.process_weights_after_loading(quantization, isa, int8_activations)
    return model.to(device).eval()


def _warn_if_head_differs(model: CausalLM, head: tuple[torch.Tensor, object] | None) -> None:
    """A tied config whose checkpoint also holds an LM head of other values: the head is left out, as
    vLLM leaves it out (transformers keeps it instead, so their answers differ): said, not silent."""
    if head is None or head[1] is not None:
        return
    embedding = model.model.embed_tokens.weight  # a tensor-parallel rank's rows, or blocks: not compared
    if head[0].shape == embedding.shape and not torch.equal(head[0].to(embedding.dtype), embedding.data):
        log.warning("the checkpoint's lm_head.weight differs from its embedding, but config.json ties them "
                    "(tie_word_embeddings): the embedding is the LM head here; set it false to use lm_head.weight")


def _check_row_length(param: torch.nn.Parameter, tensor: torch.Tensor, wtype) -> None:
    if param.dim() == 1:  # a bias: its loader checks the shard's length
        if tensor.dim() != 1:
            raise ValueError(f"has shape {tuple(tensor.shape)}, expected one dimension")
        return
    k = getattr(param, "full_in_features", param.shape[-1])  # a row-parallel shard is cut from whole rows
    want = k if wtype is None or wtype.dtype is not None else wtype.row_bytes(k)
    if tensor.dim() != 2 or tensor.shape[-1] != want:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected rows of {k} weights")


def _checkpoint_name(key: str, packed: dict[str, tuple[str, int]]) -> str:
    """'...qkv_proj.weight#1' -> '...k_proj.weight': name the tensor the checkpoint lacks, not our fused one."""
    name, shard = key.split("#")
    for proj, (fused, idx) in packed.items():
        if f".{fused}." in name and shard == str(idx):
            return name.replace(f".{fused}.", f".{proj}.")
    return name


def _shards(name: str, packed: dict[str, tuple[str, int]]) -> list[int | None]:
    """The checkpoint shards a parameter takes: those its merged layer has, else the one whole tensor."""
    shards = sorted({idx for fused, idx in packed.values() if f".{fused}." in name})
    return shards or [None]
