"""bf16 through the native paths end to end (the best ISA's linears and attention, a tape for decode
steps) is as accurate as PyTorch's own bf16 path: both are measured against the fp32 model on the
same token sequences."""
from __future__ import annotations

import statistics

import pytest
import torch

from inferlab import LLM, SamplingParams, kernels
from inferlab.model.layers import quant
from inferlab.model.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=6)
NEXT = SamplingParams(temperature=0, max_tokens=1, logprobs=5)


@pytest.fixture(scope="module")
def smol_bf16():
    return load_model(None, "bfloat16", torch.device("cpu"))


def _next_token_logprobs(llm: LLM, seqs: list[list[int]]) -> list[dict[int, float]]:
    """Top-5 logprobs after each sequence, asked one at a time in order: a sequence extending the
    previous one finds it cached, so it runs as a short chunk (the decode kernel) over the prefix."""
    return [llm.generate([{"prompt_token_ids": s}], NEXT, use_tqdm=False)[0].outputs[0].logprobs[0] for s in seqs]


def test_native_bf16_is_as_accurate_as_torch_bf16(smol, smol_bf16, chat_prompts, monkeypatch):
    prompts = chat_prompts[:4]  # they share the chat template's system prompt: later ones prefill over a prefix
    outs = LLM(loaded=smol).generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    seqs = [p + o.outputs[0].token_ids[:k] for p, o in zip(prompts, outs) for k in range(GREEDY.max_tokens)]
    exact = _next_token_logprobs(LLM(loaded=smol, attention_backend="torch"), seqs)

    native_llm = LLM(loaded=smol_bf16)
    native = _next_token_logprobs(native_llm, seqs)
    monkeypatch.setattr(kernels, "for_tensor", lambda x: None)  # PyTorch for every op
    # ... with each quantized weight dequantized once, not at every call (4x the test's time here)
    dequantized, dequantize = {}, quant.dequantize

    def once(data: torch.Tensor, wtype: quant.WeightType) -> torch.Tensor:
        key = (data.data_ptr(), tuple(data.shape), wtype.code)
        if key not in dequantized:
            dequantized[key] = dequantize(data, wtype)
        return dequantized[key]
    monkeypatch.setattr(quant, "dequantize", once)
    reference = _next_token_logprobs(LLM(loaded=smol_bf16, attention_backend="torch"), seqs)

    def error(got: list[dict[int, float]]) -> float:
        return statistics.mean(abs(g[t] - e[t]) for g, e in zip(got, exact) for t in e if t in g)
    assert error(native) <= 1.25 * error(reference) + 0.01, (error(native), error(reference))
    native_llm.engine.check_integrity()
