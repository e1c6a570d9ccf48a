"""Linear layers and embeddings split across tensor-parallel ranks (Megatron-LM's scheme, as vLLM
and nano-vllm use it), built on `model.layers.linear`: weights stay as stored, quantized blocks
included, and each rank keeps its slice.

| layer | each rank holds | its forward |
|---|---|---|
| `ColumnParallelLinear` (q/k/v, gate/up) | 1/size of each shard's rows (and bias) | its columns of y |
| `RowParallelLinear` (o, down) | 1/size of the columns, in whole blocks | partial y, one all-reduce |
| `VocabParallelEmbedding` | 1/size of the vocabulary's rows | its rows, zeros, one all-reduce |
| `ParallelLMHead` | the embedding's rows (tied or not) | its logits, gathered to rank 0 |

A row-parallel layer adds its bias on rank 0 only; vocabulary shards are equal, the last padded.

So a decoder layer costs two all-reduces of [tokens, hidden], and a column layer's output feeds
the next row layer on the same rank. Each layer takes the group current while the model is built
(`group.building`); its `weight_loader` cuts this rank's slice out of the whole checkpoint tensor,
so the loader and the checkpoint formats know nothing of ranks. With a group of one, each layer
is exactly its base layer.
"""
from __future__ import annotations

import torch
from torch import nn

from inferlab.distributed.group import current_group
from inferlab.model.layers import quant
from inferlab.model.layers.linear import Embedding, Linear
from inferlab.model.layers.quant import WeightType


class ColumnParallelLinear(Linear):
    """Output rows split: every shard of a merged layer (q, k, v; gate, up) is cut `size` ways, so
    rank r holds the r-th slice of each and its output is laid out as the unsplit layer's."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False) -> None:
        tp = current_group()
        sizes = [out_features] if isinstance(out_features, int) else list(out_features)
        super().__init__(in_features, [tp.split(n, "output features of a layer") for n in sizes], bias)
        self.tp = tp

    def _slice(self, data: torch.Tensor, shard: int | None) -> torch.Tensor:
        n = self.out_features if shard is None else self.offsets[shard + 1] - self.offsets[shard]
        if data.shape[0] != n * self.tp.size:
            raise ValueError(f"shard {shard} has {data.shape[0]} rows, expected {n * self.tp.size}")
        return data[self.tp.rank * n:(self.tp.rank + 1) * n]

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        super().weight_loader(param, self._slice(data, shard), shard, wtype)

    def bias_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                    wtype: WeightType | None = None) -> None:
        super().bias_loader(param, self._slice(data, shard), shard, wtype)


class RowParallelLinear(Linear):
    """Input columns split: rank r multiplies its slice of x (the previous column layer's output
    on this rank) by its columns of W; one all-reduce sums the partial outputs. `reduce_results=False`
    (vLLM's name) leaves the partial sum to the caller, e.g. a mixture-of-experts block that adds its
    experts' partial outputs and all-reduces once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce_results: bool = True) -> None:
        tp = current_group()
        super().__init__(tp.split(in_features, "input features of a layer"), out_features, bias)
        self.tp, self.reduce_results = tp, reduce_results
        self.weight.full_in_features = in_features  # what the loader checks a checkpoint row against

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        wtype, k = quant.weight_type(data, wtype), self.in_features
        if k % wtype.block:
            raise ValueError(f"rows of {k * self.tp.size} {wtype.name} weights do not split {self.tp.size} ways at "
                             f"block boundaries ({wtype.block} weights a block)")
        width = k if wtype.dtype is not None else wtype.row_bytes(k)  # elements, or bytes of whole blocks
        super().weight_loader(param, data[:, self.tp.rank * width:(self.tp.rank + 1) * width], shard, wtype)

    def process_weights_after_loading(self, mode: str, dtype: torch.dtype, isa: str | None, vocab: bool = False,
                                      int8: bool = False) -> None:
        super().process_weights_after_loading(mode, dtype, isa, vocab, int8)
        if self.tp.rank != 0:  # every rank's partial sum would otherwise carry it
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_reduce(y) if self.reduce_results else y


def vocab_rows(data: torch.Tensor, start: int, rows: int, vocab: int) -> torch.Tensor:
    """Rows [start, start + rows) of a [vocab, ...] checkpoint tensor, zero-padded past the vocabulary
    (zero bytes are zero weights in every stored type)."""
    if data.shape[0] != vocab:
        raise ValueError(f"a vocabulary tensor has {data.shape[0]} rows, expected {vocab} (the config's vocab_size)")
    part = data[start:start + rows]
    if part.shape[0] < rows:
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    return part


class VocabParallelEmbedding(Embedding):
    """Vocabulary rows split into equal shards (the last padded); each rank looks up the ids it
    holds, writes zeros for the others, and an all-reduce assembles every row."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        tp = current_group()
        per = -(-num_embeddings // tp.size)
        super().__init__(per, dim)
        self.tp, self.vocab_size, self.start = tp, num_embeddings, tp.rank * per
        self.num_local = max(0, min(per, num_embeddings - self.start))

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        super().weight_loader(param, vocab_rows(data, self.start, self.weight.shape[0], self.vocab_size), shard, wtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_local)
        rows = super().forward(torch.where(inside, local, 0))
        return self.tp.all_reduce(rows.masked_fill_(~inside[:, None], 0))


class ParallelLMHead(Linear):
    """The vocabulary projection, split as `VocabParallelEmbedding` (so tied weights are one
    tensor); each rank's logits are gathered to rank 0, the process that samples."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        tp = current_group()
        per = -(-vocab_size // tp.size)
        super().__init__(dim, per)
        self.tp, self.vocab_size, self.start = tp, vocab_size, tp.rank * per
        # fp32 logits whatever the model's dtype: rounded to bf16 they move in steps of 0.125 at the
        # usual magnitudes, more than a real near-tie (the France question's first token: "The"
        # leads "L" by 0.08 in fp32; bf16 logits made them equal), so rounding would pick the answer
        self.out_dtype = torch.float32

    def weight_loader(self, param: nn.Parameter, data: torch.Tensor, shard: int | None = None,
                      wtype: WeightType | None = None) -> None:
        super().weight_loader(param, vocab_rows(data, self.start, self.out_features, self.vocab_size), shard, wtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab] on rank 0, None on the other ranks."""
        logits = self.tp.gather(super().forward(hidden))
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[:, :self.vocab_size].contiguous()
