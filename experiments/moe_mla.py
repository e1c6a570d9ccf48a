"""Experiment 9: MoE and MLA — KV bytes per token, weights read per token, and what batching does.

Claims tested: "MLA's KV cache is 7-57x smaller" and "MoE needs 5-10x less compute per token".
(1) KV bytes per token and layer (bf16) for MHA, GQA and MLA at the published dimensions of
Llama-3-8B, SmolLM2-135M, DeepSeek-V2-Lite, V2 and V3, each checked against the pool the real
engine allocates for a one-layer model of that attention shape. (2) FLOPs and weight bytes per
token, active against total, for the MoE configs (counted from our own model classes, built on
PyTorch's meta device from the published config.json fields), and the weights a decode step reads
at batch 1 and 32: a batch touches the union of its tokens' experts. (3) Measured: decode step time
of a tiny MoE against a dense model of the same total parameters, at batch 1 and 32, and the MoE
layer's experts run grouped by expert against a per-token gather of expert weights.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from common import figure, parse_args, table, write

from inferlab import LLM, SamplingParams
from inferlab.kv_pool import kv_bytes_per_block
from inferlab.model.layers.moe import Experts, Routing, select_experts
from inferlab.model.llama import LlamaForCausalLM
from inferlab.model.loader import HF_ARCHS, MODELS, embedded_model_path
from inferlab.model.qwen_moe import QwenMoeForCausalLM

BF16 = 2
# config.json fields as published on the Hugging Face hub (only those the shapes depend on)
YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
           rope_theta=10000, tie_word_embeddings=False)
CONFIGS = {
    "Llama-3-8B": dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "SmolLM2-135M": dict(architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "DeepSeek-V2-Lite": dict(architectures=["DeepseekV2ForCausalLM"], hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0,
                             q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1, norm_topk_prob=False,
                             scoring_func="softmax", vocab_size=102400, rope_scaling=YARN_V2, **MLA),
    "DeepSeek-V2": dict(architectures=["DeepseekV2ForCausalLM"], hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, n_shared_experts=2,
                        n_routed_experts=160, num_experts_per_tok=6, routed_scaling_factor=16.0, q_lora_rank=1536,
                        topk_method="group_limited_greedy", n_group=8, topk_group=3, first_k_dense_replace=1,
                        norm_topk_prob=False, scoring_func="softmax", vocab_size=102400, rope_scaling=YARN_V2, **MLA),
    "DeepSeek-V3": dict(architectures=["DeepseekV3ForCausalLM"], hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1,
                        n_routed_experts=256, num_experts_per_tok=8, routed_scaling_factor=2.5, q_lora_rank=1536,
                        topk_method="noaux_tc", n_group=8, topk_group=4, first_k_dense_replace=3, norm_topk_prob=True,
                        scoring_func="sigmoid", vocab_size=129280,
                        rope_scaling={**YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}, **MLA),
    "Qwen1.5-MoE-A2.7B": dict(architectures=["Qwen2MoeForCausalLM"], hidden_size=2048, intermediate_size=5632,
                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                              num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, max_position_embeddings=8192, rope_theta=1e6),
    "Qwen3-30B-A3B": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6),
}
PUBLISHED = {"DeepSeek-V2-Lite": (15.7, 2.4), "DeepSeek-V2": (236, 21), "DeepSeek-V3": (671, 37),
             "Qwen1.5-MoE-A2.7B": (14.3, 2.7), "Qwen3-30B-A3B": (30.5, 3.3)}  # (total, active) billions
MOE_NAMES = list(PUBLISHED)


def args_of(name: str):
    cfg = CONFIGS[name]
    arch = HF_ARCHS[cfg["architectures"][0]]
    return MODELS[arch].args_from_hf(arch, cfg)


# --- (1) KV bytes per token and layer ---------------------------------------------------------

def kv_rows() -> list[list]:
    """Per config: the cache it keeps and the MHA it replaces (every head its own K and V)."""
    rows = []
    for name in ["Llama-3-8B", "SmolLM2-135M", "DeepSeek-V2-Lite", "DeepSeek-V2", "DeepSeek-V3"]:
        args = args_of(name)
        mla = hasattr(args, "kv_lora_rank")
        kind = "MLA" if mla else "GQA" if args.num_kv_heads < args.num_heads else "MHA"
        # the DeepSeek-V2 paper's baseline: K and V of d_h = 128 per head (its Table 1: 2 n_h d_h l)
        d_h = args.qk_nope_head_dim if mla else args.head_dim
        mha = 2 * args.num_heads * d_h * BF16
        rows.append([name, kind, args.kv_bytes_per_token(torch.bfloat16), engine_pool_bytes(args), mha,
                     args.num_layers])
    return rows


def engine_pool_bytes(args) -> int:
    """Bytes per token and layer of the pool the engine allocates for a one-layer model with this
    attention shape (its other widths tiny): the pool's size over its token slots."""
    small = dict(num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=512)
    if hasattr(args, "num_experts"):
        small.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, moe_layers=(0,),
                     n_group=1, topk_method="greedy" if hasattr(args, "kv_lora_rank") else None)
        small = {k: v for k, v in small.items() if v is not None}
    tiny = dataclasses.replace(args, **small)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = MODELS[tiny.arch](tiny).eval()
    finally:
        torch.set_default_dtype(default)
    llm = LLM(loaded=(model, tokenizer()), num_kv_blocks=4, block_size=16, enforce_eager=True)
    pool = llm.engine.runner.kv_cache
    assert pool.numel() * pool.element_size() == 4 * kv_bytes_per_block(tiny, 16, torch.bfloat16)
    return pool.numel() * pool.element_size() // (4 * 16)


_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        from inferlab.model.gguf_reader import GGUFFile
        from inferlab.model.tokenizer import Tokenizer
        _TOKENIZER.append(Tokenizer.from_gguf_fields(GGUFFile(embedded_model_path()).fields))
    return _TOKENIZER[0]


# --- (2) parameters, FLOPs and bytes per token --------------------------------------------------

def counts(name: str) -> dict:
    """Parameters of the whole model and per token, from our classes built on the meta device: one
    dense and one MoE layer stand for all of their kind (layers of a kind are identical)."""
    args = args_of(name)
    moe, dense = len(args.moe_layers), args.num_layers - len(args.moe_layers)
    sample = dataclasses.replace(args, num_layers=2 if dense else 1, moe_layers=(1,) if dense else (0,))
    with torch.device("meta"):
        model = MODELS[args.arch](sample)
    layers = model.model.layers
    moe_layer, dense_layer = layers[-1], layers[0] if dense else None
    expert = sum(p.numel() for p in moe_layer.mlp.experts[0].parameters())
    n_experts, k = args.num_experts, args.num_experts_per_tok
    moe_shared = sum(p.numel() for p in moe_layer.parameters()) - n_experts * expert  # attention, router, shared
    dense_total = sum(p.numel() for p in dense_layer.parameters()) if dense else 0
    embed = head = args.vocab_size * args.hidden_size  # the LM head reads a whole matrix per step, tied or not
    total = embed * (1 if args.tie_word_embeddings else 2) + args.hidden_size + dense * dense_total \
        + moe * (moe_shared + n_experts * expert)

    def read_per_step(batch: int) -> float:
        """Weights one decode step of `batch` tokens reads: all but the experts, and the experts that
        at least one token chose (uniform independent routing: E (1 - (1 - k/E)^batch))."""
        touched = n_experts * (1 - (1 - k / n_experts) ** batch)
        return head + args.hidden_size + dense * dense_total + moe * (moe_shared + touched * expert)

    active = read_per_step(1)  # exactly k experts per MoE layer
    return {"total": total, "active": active, "flops": 2 * active, "dense_flops": 2 * (total - embed),
            "read_1": read_per_step(1), "read_32": read_per_step(32), "experts": (n_experts, k),
            "touched_32": n_experts * (1 - (1 - k / n_experts) ** 32)}


# --- (3) measured ---------------------------------------------------------------------------------

def tiny_models(smoke: bool):
    """A small MoE (Qwen3-MoE shape) and a dense Llama of the same total parameters: each MoE layer's
    16 experts of width I sum to one dense MLP of width 16 I."""
    from inferlab.model.base import ModelArgs
    from inferlab.model.qwen_moe import QwenMoeArgs
    hidden, layers, experts, width = (128, 2, 8, 64) if smoke else (512, 4, 16, 256)
    shape = dict(hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=hidden // 8,
                 vocab_size=512, max_position=4096, rms_norm_eps=1e-6)
    moe = QwenMoeArgs(arch="qwen3_moe", intermediate_size=0, qk_norm=True, num_experts=experts, num_experts_per_tok=2,
                      moe_intermediate_size=width, norm_topk_prob=True, moe_layers=tuple(range(layers)), **shape)
    dense = ModelArgs(arch="qwen3", intermediate_size=experts * width, qk_norm=True, **shape)
    torch.manual_seed(0)
    out = []
    for args, cls in ((moe, QwenMoeForCausalLM), (dense, LlamaForCausalLM)):
        model = cls(args).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        out.append(model)
    return out


def decode_step_ms(model, batch: int, steps: int) -> tuple[float, float]:
    """Median decode step (ms) with `batch` requests decoding, and the mean number of distinct experts
    the first MoE layer's router chose per step (0 for a dense model)."""
    llm = LLM(loaded=(model, tokenizer()), num_kv_blocks=64 * batch, block_size=16, enforce_eager=True)
    engine = llm.engine
    touched: list[int] = []
    router = next((m for m in model.modules() if type(m).__name__ == "Router"), None)
    hook = router.register_forward_hook(lambda m, i, out: touched.append(out[1].unique().numel())) if router else None
    for i in range(batch):
        engine.add_request(str(i), {"prompt_token_ids": [(7 * i + j) % 500 + 1 for j in range(8)]},
                           SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True))
    times = []
    engine.step()  # the prefills
    touched.clear()
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    if hook:
        hook.remove()
    return 1000 * statistics.median(times), sum(touched) / len(touched) if touched else 0.0


def gather_experts(x, weights, ids, gate_up, down) -> torch.Tensor:
    """The per-token alternative: each token gathers its k experts' matrices and multiplies by them."""
    h = torch.einsum("toh,th->to", gate_up[ids].flatten(0, 1), x.repeat_interleave(ids.shape[1], 0))
    g, u = h.chunk(2, dim=-1)
    y = torch.einsum("tho,to->th", down[ids].flatten(0, 1), F.silu(g) * u)
    return (y.view(*ids.shape, -1) * weights[..., None]).sum(1)


def median_ms(fn, args: tuple, reps: int) -> float:
    fn(*args)  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def grouped_vs_gather(smoke: bool) -> list[list]:
    torch.manual_seed(0)
    n_experts, hidden, width, k = (8, 128, 64, 2) if smoke else (16, 512, 256, 2)
    experts = Experts(n_experts, hidden, width)
    for p in experts.parameters():
        p.data.normal_(0, 0.05)
    gate_up = torch.stack([e.gate_up_proj.weight for e in experts])
    down = torch.stack([e.down_proj.weight for e in experts])
    rows = []
    for tokens in ((1, 8) if smoke else (1, 4, 16, 64)):
        x = torch.randn(tokens, hidden)
        weights, ids = select_experts(torch.randn(tokens, n_experts), Routing(top_k=k, renormalize=True))
        torch.testing.assert_close(gather_experts(x, weights, ids, gate_up, down), experts(x, weights, ids),
                                   rtol=1e-4, atol=1e-4)
        grouped = median_ms(experts, (x, weights, ids), 3 if smoke else 20)
        gathered = median_ms(gather_experts, (x, weights, ids, gate_up, down), 3 if smoke else 20)
        rows.append([tokens, grouped, gathered, gathered / grouped])
    return rows


def gather_sentence(rows: list[list]) -> str:
    ratios = [r[3] for r in rows]
    said = (f"Gathering each token's expert matrices took {min(ratios):.1f}-{max(ratios):.1f}x the time of running "
            "each chosen expert once on all its tokens (grouped), ")
    if min(ratios) > 1:
        return said + "so the engine keeps the grouped form."
    wins = [str(r[0]) for r in rows if r[3] <= 1]
    return said + (f"the gather winning at {', '.join(wins)} token(s): at these sizes Python's per-expert loop "
                   "costs more than copying the weights.")


def main() -> None:
    a = parse_args(__doc__)
    kv = kv_rows()
    kv_table = table(["model", "cache", "KV bytes / token / layer", "engine's pool, per token / layer",
                      "MHA with the same heads", "MHA / this", "layers", "KV per token, all layers"],
                     [[n, kind, b, pool, mha, f"{mha / b:.1f}x", layers, f"{b * layers / 1024:.1f} KiB"]
                      for n, kind, b, pool, mha, layers in kv])
    smol = next(r for r in kv if r[0] == "SmolLM2-135M")[2]
    v3 = next(r for r in kv if r[0] == "DeepSeek-V3")[2]

    names = MOE_NAMES[:2] if a.smoke else MOE_NAMES
    c = {n: counts(n) for n in names}
    moe_table = table(["model", "experts (chosen / all)", "params total (B)", "active / token (B)",
                       "published (total, active)", "FLOPs / token, active vs all", "weights read / step, batch 1",
                       "batch 32", "experts a batch of 32 touches"],
                      [[n, f"{v['experts'][1]} / {v['experts'][0]}", f"{v['total'] / 1e9:.1f}",
                        f"{v['active'] / 1e9:.2f}", f"{PUBLISHED[n][0]}, {PUBLISHED[n][1]}",
                        f"{v['dense_flops'] / v['flops']:.1f}x fewer", f"{100 * v['read_1'] / v['total']:.0f}%",
                        f"{100 * v['read_32'] / v['total']:.0f}%", f"{v['touched_32']:.0f}"] for n, v in c.items()])

    moe_model, dense_model = tiny_models(a.smoke)
    moe_params = sum(p.numel() for p in moe_model.parameters())
    dense_params = sum(p.numel() for p in dense_model.parameters())
    steps = 4 if a.smoke else 24
    measured = []
    for batch in (1, 32):
        m_ms, touched = decode_step_ms(moe_model, batch, steps)
        d_ms, _ = decode_step_ms(dense_model, batch, steps)
        measured.append([batch, m_ms, d_ms, d_ms / m_ms, touched])
    step_table = table(["batch", "MoE step (ms)", "dense step (ms)", "dense / MoE", "experts touched per layer"],
                       measured)
    gather = grouped_vs_gather(a.smoke)
    gather_table = table(["tokens", "grouped by expert (ms)", "per-token gather (ms)", "gather / grouped"], gather)

    fig, axes = figure(3, 4.6)
    ax_kv, ax_moe, ax_step = axes[0]
    labels = [r[0].replace("-", "\n", 1) + "\n" + r[1] for r in kv]
    ax_kv.bar(labels, [r[4] for r in kv], color="lightgray", label="MHA, same heads")
    ax_kv.bar(labels, [r[2] for r in kv], color="tab:blue", label="as kept")
    ax_kv.set_yscale("log")
    ax_kv.set_ylabel("KV bytes / token / layer (bf16)")
    ax_kv.tick_params(axis="x", labelsize=7)
    ax_kv.legend(fontsize=8)
    xs = range(len(c))
    ax_moe.bar([x - 0.2 for x in xs], [100 * v["read_1"] / v["total"] for v in c.values()], 0.4, label="batch 1")
    ax_moe.bar([x + 0.2 for x in xs], [100 * v["read_32"] / v["total"] for v in c.values()], 0.4, label="batch 32")
    ax_moe.set_xticks(list(xs), [n.replace("-", "-\n", 1) for n in c], fontsize=7)
    ax_moe.set_ylabel("weights read per step (% of all)")
    ax_moe.legend(fontsize=8)
    ax_step.bar([x - 0.2 for x in range(2)], [r[1] for r in measured], 0.4, label=f"MoE ({moe_params / 1e6:.1f}M)")
    ax_step.bar([x + 0.2 for x in range(2)], [r[2] for r in measured], 0.4, label=f"dense ({dense_params / 1e6:.1f}M)")
    ax_step.set_xticks(range(2), ["batch 1", "batch 32"])
    ax_step.set_ylabel("decode step (ms, measured)")
    ax_step.legend(fontsize=8)

    lite = next(r for r in kv if r[0] == "DeepSeek-V2-Lite")
    big = next(r for r in kv if r[0] == "DeepSeek-V2")
    v3c = c.get("DeepSeek-V3")
    text = [
        f"**KV cache.** MLA keeps {v3:,} bytes per token and layer at DeepSeek's sizes (kv_lora_rank 512 plus the "
        f"64-wide RoPE key, bf16) whatever the head count: {lite[4] / lite[2]:.1f}x less than MHA with V2-Lite's 16 "
        f"heads and {big[4] / big[2]:.1f}x less with V2/V3's 128, which is where the '7-57x' comes from. It is a "
        f"ratio against MHA: against GQA it is smaller (Llama-3-8B's 8 KV heads keep "
        f"{next(r for r in kv if r[0] == 'Llama-3-8B')[2]:,} bytes), and SmolLM2-135M's 3 small KV heads keep only "
        f"{smol:,} bytes, {v3 / smol:.1f}x less than MLA at DeepSeek's sizes. The engine's pool for a one-layer "
        "model of each shape holds exactly the computed bytes per token (column 4).",
        "**Compute and weights.** Per token, the MoE configs compute "
        + ", ".join(f"{n} {v['dense_flops'] / v['flops']:.1f}x" for n, v in c.items())
        + " fewer matmul FLOPs than a dense model of the same total parameters (the attention's context-dependent "
        "FLOPs left out). At batch 1 a decode step reads only the active weights; a batch of 32 tokens routes to "
        "the union of their experts"
        + (f", {v3c['touched_32']:.0f} of DeepSeek-V3's 256 per layer," if v3c else "")
        + " so the weights read per step, the cost of a CPU decode step, grow back toward the whole model: the "
        "saving is in FLOPs per token, and in bytes read only at small batches.",
        f"**Measured** (tiny random models, {moe_params / 1e6:.1f}M parameters each, float32): the MoE decode step "
        f"takes {measured[0][1]:.1f} ms against the dense model's {measured[0][2]:.1f} ms at batch 1, "
        f"{measured[1][1]:.1f} ms against {measured[1][2]:.1f} ms at batch 32, where its first layer's router "
        f"touched {measured[1][4]:.1f} of {moe_model.args.num_experts} experts per step: its weights are all "
        "read again, but each token still multiplies by only 2 experts. " + gather_sentence(gather),
    ]
    write(a.out, "moe_mla", "MoE and MLA: KV bytes, weights read, and batching",
          ["KV cache per token (bf16). MHA with the same heads: every query head its own K and V of the head "
           "width d_h (DeepSeek: d_h = 128, the DeepSeek-V2 paper's 2 n_h d_h per token and layer).", kv_table,
           "MoE configs: parameters and reads per token (bf16 weights; reads assume uniform routing). Active: "
           "every weight a token multiplies by, the embedding table aside (one row read); Qwen's published active "
           "counts include the embedding table (+0.31B), DeepSeek's do not.", moe_table,
           "Measured decode step, tiny MoE against a dense model of the same total parameters (one thread).",
           step_table, "An MoE layer's experts alone: grouped by expert against a per-token gather (float32).",
           gather_table, *text], fig)


if __name__ == "__main__":
    main()
