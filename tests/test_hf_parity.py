"""The embedded model's greedy output equals HF transformers' greedy generate, token for token."""
from __future__ import annotations

import os

import pytest
import torch

from inferlab import SamplingParams
from inferlab.model.loader import embedded_model_path

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_outputs(chat_prompts):
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in chat_prompts:
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              pad_token_id=2)[0, len(ids):].tolist()
            outs.append(gen)
    return outs


def test_prompts_cover_different_lengths(chat_prompts):
    lengths = sorted(len(p) for p in chat_prompts)
    assert len(chat_prompts) >= 8 and lengths[-1] - lengths[0] > 30


def test_greedy_matches_hf_alone_and_batched(make_llm, chat_prompts, hf_outputs):
    llm = make_llm(num_kv_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    batch = llm.generate([{"prompt_token_ids": p} for p in chat_prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batch] == hf_outputs
    for ids, expected in zip(chat_prompts, hf_outputs, strict=True):
        alone = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == expected
    # HF stops at EOS too; when it did, so did we, with the right reason
    for out, expected in zip(batch, hf_outputs, strict=True):
        ended = expected[-1] == 2 and len(expected) < MAX_TOKENS
        assert out.outputs[0].finish_reason == ("stop" if ended else "length")


def test_france_answer(make_llm):
    llm = make_llm(num_kv_blocks=64)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"
