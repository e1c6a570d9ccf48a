"""A decode step's decoder layers in one native call (`kernels/decode_step.c`).

The per-op path (`DecoderLayer.forward`) crosses from Python into C ten times a layer, 300 times
a step for the embedded model; at a few rows each crossing costs about as much as the kernel it
calls. For steps where every row reads the cache through the row kernel (decodes, short chunks
over a prefix) and the matmuls run on AMX (1-64 rows, bf16), this calls the same kernels in the
same order from C instead: the output is bit-identical (tested), the Python is gone. Everything
else (prefill chunks, other dtypes and CPUs, Qwen3's q/k norms) keeps the per-op path.
"""
from __future__ import annotations

import ctypes

import torch

from inferlab.attention import AttentionMetadata
from inferlab.model.llama import LlamaForCausalLM

MAX_ROWS = 64  # the AMX matmul's row limit (`ops.NATIVE_LINEAR_MAX_ROWS`)


class FusedDecode:
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        a, block_size = model.args, kv_caches[0][0].shape[1]  # pool: [num_blocks, block_size, kv_heads, d]
        self.dims = (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size, block_size)
        # One row of addresses per layer, in decode_step.c's order. The tensors stay put: the model
        # holds its parameters and the runner its pool for the engine's life.
        ptrs = []
        for layer, (k_cache, v_cache) in zip(model.model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            ptrs.append([layer.input_layernorm.weight.data_ptr(), attn.qkv_proj.weight.data_ptr(),
                         0 if bias is None else bias.data_ptr(), attn.o_proj.weight.data_ptr(),
                         layer.post_attention_layernorm.weight.data_ptr(), mlp.gate_up_proj.weight.data_ptr(),
                         mlp.down_proj.weight.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()])
        self.layers = torch.tensor(ptrs, dtype=torch.int64)

    @classmethod
    def build(cls, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
              lib: ctypes.CDLL | None) -> FusedDecode | None:
        """The fused path where it runs for this model, CPU and pool; else None."""
        tensors = list(model.parameters()) + [t for kv in kv_caches for t in kv]
        if lib is None or model.args.qk_norm or \
                any(t.dtype != torch.bfloat16 or not t.is_contiguous() or not t.is_cpu for t in tensors):
            return None
        fused = cls(model, kv_caches, lib)
        # the kernel answers for this build, CPU and shape, given an empty step
        probe = lib.decode_layers(None, None, None, 0, None, None, None, None, None, None, None, 0, 0, *fused.dims,
                                  1.0, 1.0, 1)
        return fused if probe == 0 else None

    def covers(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether the step is one this path runs: every row through the row kernel, few enough rows."""
        native = meta.native
        return (native is not None and native.chunks is None and not meta.prefills and num_tokens <= MAX_ROWS
                and native.rows.numel() == num_tokens)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as `LlamaForCausalLM.forward` returns them."""
        model, n, args = self.model, meta.native, self.model.args
        cos, sin = model.rope_cos_sin(positions)
        x = model.model.embed_tokens(input_ids)
        residual = torch.empty_like(x)
        status = self.lib.decode_layers(
            x.data_ptr(), residual.data_ptr(), self.layers.data_ptr(), args.num_layers, cos.data_ptr(), sin.data_ptr(),
            meta.slot_mapping.data_ptr(), n.rows.data_ptr(), n.seqs.data_ptr(), n.lens.data_ptr(),
            n.block_tables.data_ptr(), n.block_tables.shape[1], x.shape[0], *self.dims, args.rms_norm_eps,
            args.head_dim ** -0.5, torch.get_num_threads())
        if status:
            raise MemoryError("decode_layers: out of memory for its buffers") if status == 2 else \
                RuntimeError("decode_layers refused a step it had accepted")
        return model.model.norm(x, residual)[0]
