"""Decode steps' layers in one native call give exactly what the per-op path gives, step by step,
on the embedded model and on a tiny Qwen2-shaped model (q/k/v biases); steps it does not cover
(prefill chunks, more than 64 rows) and models it does not run (Qwen3's q/k norms) keep the per-op path."""
from __future__ import annotations

import pytest
import torch

from inferlab import LLM, SamplingParams
from inferlab.model.llama import LlamaForCausalLM, ModelArgs


class Checked:
    """Stands in for the runner's fused path: runs it, then the per-op model on the same step, and
    records (rows, whether the hidden states are identical)."""

    def __init__(self, runner) -> None:
        self.runner, self.fused, self.steps, self.others = runner, runner.fused, [], []

    def covers(self, meta, num_tokens: int) -> bool:
        if self.fused.covers(meta, num_tokens):
            return True
        self.others.append(num_tokens)
        return False

    def __call__(self, input_ids, positions, meta) -> torch.Tensor:
        got = self.fused(input_ids, positions, meta)
        want = self.runner.model(input_ids, positions, self.runner.kv_caches, meta)
        self.steps.append((input_ids.numel(), torch.equal(got, want)))
        return got


def _check(llm: LLM, batches: list[list[list[int]]], max_tokens: int) -> Checked:
    runner = llm.engine.runner
    if runner.fused is None:
        pytest.skip("this CPU has no AMX tiles: decode steps run op by op")
    runner.fused = checked = Checked(runner)
    for prompts in batches:
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=max_tokens),
                     use_tqdm=False)
    llm.engine.check_integrity()
    return checked


@pytest.fixture(scope="module")
def smol_bf16():
    from inferlab.model.loader import load_model
    return load_model(None, "bfloat16", torch.device("cpu"))


def test_embedded_model_decode_steps_match_per_op_path(smol_bf16, chat_prompts):
    llm = LLM(loaded=smol_bf16)
    prompts = chat_prompts[:6] + [chat_prompts[0] + [42, 43, 44]]  # the last: a short chunk over a cached prefix
    checked = _check(llm, [prompts], max_tokens=5)
    steps = checked.steps
    assert steps and all(same for _, same in steps), steps
    assert 7 in {n for n, _ in steps}, steps  # the full batch of decodes ran fused
    assert checked.others, "the prefill steps kept the per-op path"


def test_whole_generations_match_per_op_engine(smol_bf16, chat_prompts):
    """Separate engines, so neither path's K/V writes can cover for the other's over 24 steps. The
    thread count is fixed: with fewer threads, smaller batches take the tile attention kernel."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [{"prompt_token_ids": p} for p in chat_prompts]
    before = torch.get_num_threads()
    try:
        fused_llm, per_op_llm = LLM(loaded=smol_bf16, num_threads=2), LLM(loaded=smol_bf16, num_threads=2)
        if fused_llm.engine.runner.fused is None:
            pytest.skip("this CPU has no AMX tiles: decode steps run op by op")
        per_op_llm.engine.runner.fused = None
        fused = [o.outputs[0].token_ids for o in fused_llm.generate(prompts, params, use_tqdm=False)]
        per_op = [o.outputs[0].token_ids for o in per_op_llm.generate(prompts, params, use_tqdm=False)]
    finally:
        torch.set_num_threads(before)
    assert fused == per_op


def _tiny(tokenizer, qk_norm: bool = False) -> tuple[LlamaForCausalLM, object]:
    """Two random bf16 layers, Qwen2-shaped (q/k/v biases) or Qwen3-shaped (q/k norms)."""
    torch.manual_seed(0)
    args = ModelArgs(arch="qwen3" if qk_norm else "qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=96, vocab_size=tokenizer.vocab_size, max_position=512,
                     attention_bias=not qk_norm, qk_norm=qk_norm)
    model = LlamaForCausalLM(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(torch.bfloat16), tokenizer


def test_qwen2_biases_match_per_op_path(smol):
    llm = LLM(loaded=_tiny(smol[1]), num_kv_blocks=160, block_size=16)
    prompts = [[5 + i, 7, 11 + 3 * i, 13][:2 + i % 3] for i in range(70)]
    checked = _check(llm, [prompts[:20], prompts], max_tokens=4)  # 20 decodes, then 70: over the limit
    assert checked.steps and all(same for _, same in checked.steps), checked.steps
    assert 70 in checked.others and max(n for n, _ in checked.steps) <= 64, (checked.others, checked.steps)


def test_qwen3_keeps_per_op_path(smol):
    llm = LLM(loaded=_tiny(smol[1], qk_norm=True), num_kv_blocks=64, block_size=16)
    assert llm.engine.runner.fused is None


def test_enforce_eager_runs_the_python_model(smol):
    model, tokenizer = _tiny(smol[1])
    if LLM(loaded=(model, tokenizer), num_kv_blocks=64).engine.runner.fused is None:
        pytest.skip("this CPU has no AMX tiles: decode steps run op by op")
    llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64, enforce_eager=True)
    assert llm.engine.runner.fused is None
    calls = []
    model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))  # an edit to the Python model
    llm.generate([{"prompt_token_ids": [5, 7, 11]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(calls) == 4  # the prefill step and three decode steps all ran it
