"""The MoE and MLA building blocks on their own: routing against a straightforward reference (ties
included), experts grouped per expert against one token at a time, MLA's absorbed form against its
up-projected form on the same weights and cache, and YaRN against transformers' own computation."""
from __future__ import annotations

import math

import pytest
import torch

from inferlab import kernels
from inferlab.model.layers.mla import MLAAttention, deinterleave
from inferlab.model.layers.moe import Experts, Router, Routing, select_experts
from inferlab.model.layers.rotary import RotaryEmbedding, rope_attention_factor, rope_inv_freq


def reference_routing(scores: list[float], bias: list[float], r: Routing) -> tuple[list[int], list[float]]:
    """One token, by the definition, in plain Python: ties go to the lower index."""
    choice = [s + b for s, b in zip(scores, bias)]
    n = len(scores)
    eligible = list(range(n))
    if r.num_groups > 1:
        size = n // r.num_groups
        groups = [sorted(choice[g * size:(g + 1) * size], reverse=True) for g in range(r.num_groups)]
        group_scores = [g[0] if r.group_score == "max" else g[0] + g[1] for g in groups]
        best = sorted(range(r.num_groups), key=lambda g: (-group_scores[g], g))[:r.topk_groups]
        eligible = [e for e in range(n) if e // size in best]
    ids = sorted(eligible, key=lambda e: (-choice[e], e))[:r.top_k]
    weights = [scores[e] for e in ids]
    if r.renormalize:
        weights = [w / (sum(weights) + 1e-20) for w in weights]
    return ids, [w * r.scaling for w in weights]


ROUTINGS = {
    "softmax": Routing(top_k=4),
    "softmax_renormalized": Routing(top_k=4, renormalize=True),
    "v2_group_limited": Routing(top_k=3, num_groups=4, topk_groups=2, group_score="max", scaling=1.5),
    "v3_grouped": Routing(top_k=4, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                          group_score="top2", scaling=2.5, correction_bias=True),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
def test_routing_matches_reference(name, ties):
    routing, g = ROUTINGS[name], torch.Generator().manual_seed(7)
    tokens, experts = 200, 16
    if ties:  # few distinct logits and biases: many equal scores, equal groups, equal sums
        logits = torch.randint(0, 3, (tokens, experts), generator=g).float()
        bias = torch.randint(-1, 2, (experts,), generator=g).float() * 0.25
    else:
        logits, bias = torch.randn(tokens, experts, generator=g) * 2, torch.randn(experts, generator=g) * 0.3
    bias = bias if routing.correction_bias else torch.zeros(experts)
    weights, ids = select_experts(logits, routing, bias if routing.correction_bias else None)
    scores = logits.softmax(-1) if routing.scoring == "softmax" else logits.sigmoid()
    for t in range(tokens):
        ref_ids, ref_weights = reference_routing(scores[t].tolist(), bias.tolist(), routing)
        assert ids[t].tolist() == ref_ids, t
        torch.testing.assert_close(weights[t], torch.tensor(ref_weights), rtol=1e-6, atol=1e-7)
    if routing.correction_bias:  # the bias steers the choice but never enters the weights
        assert not torch.allclose(weights, select_experts(logits, routing)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_experts_do_not_depend_on_the_tokens_beside_it(dtype):
    """The router's scores of a token alone and among a step's others are the same bits: near-equal
    experts must not swap because a batch changed how a library summed (PyTorch's F.linear did)."""
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable: the PyTorch path makes no such promise")
    router = Router(96, 40, Routing(top_k=4))
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    weights, ids = router(x)
    for t in (0, 1, 33, 69):
        alone = router(x[t:t + 1])
        assert torch.equal(alone[0][0], weights[t]) and torch.equal(alone[1][0], ids[t]), f"token {t}"


def test_experts_grouped_equal_one_token_at_a_time():
    torch.manual_seed(0)
    experts = Experts(6, 32, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(40, 32)
    weights, ids = select_experts(torch.randn(40, 6), Routing(top_k=2, renormalize=True))
    ids[3] = torch.tensor([5, 5])  # one token choosing the same expert twice still counts twice
    expected = torch.stack([sum(w * experts[int(e)](x[t:t + 1])[0] for w, e in zip(weights[t], ids[t]))
                            for t in range(40)])
    torch.testing.assert_close(experts(x, weights, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["no_q_lora", "q_lora"])
def test_mla_absorbed_equals_up_projected(q_lora_rank):
    """The same queries over the same latent cache: attention through W_UK-absorbed queries over the
    latent equals attention over per-head K/V up-projected from it."""
    torch.manual_seed(0)
    heads, rank, nope, rope_dim, v_dim, ctx, block_size = 4, 32, 16, 8, 12, 11, 4
    mla = MLAAttention(48, heads, q_lora_rank, rank, nope, rope_dim, v_dim, 1e-6, scale=0.2)
    torch.nn.init.normal_(mla.kv_b_proj.weight, std=0.3)
    cache = torch.zeros(8, block_size, 1, rank + rope_dim)
    table = torch.tensor([5, 1, 7])  # scattered blocks covering 11 tokens
    context = torch.randn(ctx, rank + rope_dim)
    slots = table[torch.arange(ctx) // block_size] * block_size + torch.arange(ctx) % block_size
    cache.view(-1, rank + rope_dim)[slots] = context
    q_nope, q_pe = torch.randn(3, heads, nope), torch.randn(3, heads, rope_dim)  # the context's last 3 tokens
    up = mla.attend_up_projected(q_nope, q_pe, context)
    absorbed = mla.attend_absorbed(q_nope, q_pe, cache, table.repeat(3, 1), torch.tensor([ctx - 2, ctx - 1, ctx]))
    assert up.shape == absorbed.shape == (3, heads, v_dim)
    torch.testing.assert_close(absorbed, up, rtol=1e-5, atol=1e-5)


def test_deinterleave_turns_adjacent_pairs_into_halves():
    order = deinterleave(2, 6, 4)  # two heads of 2 plain + 4 rotary rows
    assert order.tolist() == [0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 0.707, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "attention_factor": 1.3,
     "truncate": False},
], ids=["qwen", "deepseek_v2", "mscale_ratio", "explicit"])
def test_yarn_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=8192,
                         rope_parameters={**scaling, "rope_theta": 10000.0})
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, scaling), inv_freq, rtol=0, atol=0)
    assert math.isclose(rope_attention_factor(scaling), factor, rel_tol=1e-12)
    cos, _ = RotaryEmbedding(64, 10000.0, scaling)(torch.tensor([0, 5]))
    torch.testing.assert_close(cos[0], torch.full((32,), float(factor)))
