"""The embedded model's greedy output equals HF transformers' greedy generate, token for token."""
from __future__ import annotations

import os

import pytest
import torch

from inferlab import SamplingParams
from inferlab.model.loader import embedded_model_path

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_outputs(hf, chat_prompts):
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


def test_prompt_logprobs_are_hfs_whatever_the_chunks_and_the_cache(make_llm, chat_prompts, hf):
    """Each prompt token's logprob given the ones before it (vLLM's prompt_logprobs, what evaluation
    harnesses score answers with) is HF's log_softmax at the position before, with the top-N there,
    whether the prompt is computed in one chunk or many, alone or beside other requests. A prompt the
    prefix cache holds is computed again for them, and scores the same."""
    ids, other = chat_prompts[0], chat_prompts[1]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    scored = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3)
    # 16: the prompt in chunks, each scoring its rows; the radix tree's cache bypassed as the hash chain's
    for config in ({}, {"max_num_batched_tokens": 16}, {"prefix_cache": "radix"}):
        llm = make_llm(num_kv_blocks=256, **config)
        alone = llm.generate({"prompt_token_ids": other}, greedy, use_tqdm=False)[0]
        first, beside = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": other}], [scored, greedy],
                                     use_tqdm=False)
        again = llm.generate({"prompt_token_ids": ids}, scored, use_tqdm=False)[0]
        cached = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]
        assert beside.outputs[0].token_ids == alone.outputs[0].token_ids and beside.prompt_logprobs is None
        assert cached.num_cached_tokens > 0 and again.num_cached_tokens == 0  # scored rows are computed
        for out in (first, again):
            lps = out.prompt_logprobs
            assert lps[0] is None and len(lps) == len(ids)
            assert out.outputs[0].token_ids == cached.outputs[0].token_ids
            for q in range(len(ids) - 1):
                entry, want, target = lps[q + 1], ref[q], ids[q + 1]
                lp = float(want[target])
                assert abs(entry[target] - lp) < 1e-3
                assert (want > lp + 1e-3).sum() + 1 <= entry[target].rank <= (want > lp - 1e-3).sum() + 1
                top = list(entry)[:3]
                assert [entry[t].rank for t in top] == [1, 2, 3]
                assert torch.allclose(torch.tensor([float(entry[t]) for t in top]), want.topk(3).values, atol=1e-3)
        assert [dict(e) for e in first.prompt_logprobs[1:]] == [dict(e) for e in again.prompt_logprobs[1:]]


def test_embedding_is_hfs_last_hidden_state_of_the_last_token(make_llm, hf, chat_prompts):
    """vLLM's LAST pooling: the final norm's output at the prompt's last token, scaled to length 1."""
    llm = make_llm(num_kv_blocks=256)
    ours = llm.embed([{"prompt_token_ids": p} for p in chat_prompts[:4]], use_tqdm=False)
    with torch.inference_mode():
        for ids, out in zip(chat_prompts[:4], ours, strict=True):
            h = hf.model(torch.tensor([ids])).last_hidden_state[0, -1]  # after the final norm
            theirs = torch.nn.functional.normalize(h, dim=-1)
            assert (torch.tensor(out.outputs.embedding) - theirs).abs().max() < 1e-4
            assert out.prompt_token_ids == ids
