"""Mixture of experts: a router scores every expert for every token and picks a few; the token's
output is the weighted sum of its experts' MLPs.

    scores  = softmax(x W_g^T)  or  sigmoid(x W_g^T)                     (Qwen, DeepSeek-V2 / V3)
    chosen  = top-k of scores (+ e_score_correction_bias, DeepSeek-V3: it steers the choice only),
              among the experts of the best `topk_group` of `n_group` groups where groups are used
    weights = scores[chosen] (renormalised to sum to 1 if asked) * routed_scaling_factor
    y       = sum_i weights_i * MLP_chosen_i(x)

Experts run grouped: the step's (token, expert) pairs are sorted by expert and each chosen expert
runs once on all its tokens, so its weights are read once per step, however many tokens chose it.
Ties between scores go to the lower expert (or group) index, so the choice is deterministic.
Routing and the grouping are PyTorch ops (a forward with them runs op by op, never from a tape);
each expert's matmuls are `Linear`s, which run the native kernels on any stored weight type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferlab.model.layers import quant
from inferlab.model.layers.linear import linear
from inferlab.model.layers.mlp import MLP


@dataclass(frozen=True)
class Routing:
    top_k: int
    scoring: str = "softmax"  # or "sigmoid"
    renormalize: bool = False
    num_groups: int = 1  # > 1: experts split into groups, only the best `topk_groups` groups are eligible
    topk_groups: int = 1
    group_score: str = "max"  # a group's score: its best expert's ("max", DeepSeek-V2) or best two's sum ("top2", V3)
    scaling: float = 1.0  # routed_scaling_factor
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias


def top_k_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of each row, largest first; equal scores: the lower index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def mask_groups(scores: torch.Tensor, num_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """-inf on every expert outside each row's best `topk_groups` groups."""
    t, e = scores.shape
    grouped = scores.view(t, num_groups, e // num_groups)
    if group_score == "max":
        per_group = grouped.max(dim=-1).values
    else:
        per_group = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros(t, num_groups, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, top_k_ids(per_group, topk_groups), True)
    return scores.masked_fill(~keep.repeat_interleave(e // num_groups, dim=1), float("-inf"))


def select_experts(logits: torch.Tensor, routing: Routing,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    scores = logits.softmax(dim=-1) if routing.scoring == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    if routing.num_groups > 1:
        choice = mask_groups(choice, routing.num_groups, routing.topk_groups, routing.group_score)
    ids = top_k_ids(choice, routing.top_k)
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scaling, ids


class Router(nn.Module):
    """The gate (HF: `mlp.gate`): W_g [E, hidden] and the correction bias, kept in fp32 as DeepSeek
    trains them: near-equal scores must not swap order by rounding."""

    def __init__(self, hidden_size: int, num_experts: int, routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False) if routing.correction_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the kernels' product, whose rows do not depend on the batch (PyTorch's F.linear changed a
        # token's scores, and so its experts, with how many tokens shared the step)
        scores = linear(x.float().contiguous(), self.weight, quant.F32)
        return select_experts(scores, self.routing, self.e_score_correction_bias)


class Experts(nn.ModuleList):
    """The routed experts (HF: `mlp.experts.<e>`), each a gated MLP."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__(MLP(hidden_size, intermediate_size) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], weights and ids [T, k] -> sum over each token's k experts, [T, hidden]."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # (token, slot) pairs sorted by expert
        counts = torch.bincount(flat, minlength=len(self)).tolist()
        tokens = order // k
        pair_weights = weights.flatten()[order].to(x.dtype)[:, None]
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self, counts):
            if n:
                rows = tokens[start:start + n]
                out.index_add_(0, rows, expert(x[rows]) * pair_weights[start:start + n])
                start += n
        return out
