"""Sampler and stop rules on the embedded model: seeds, top-k/top-p/min-p, penalties, stop
conditions, streaming deltas, logprobs and SamplingParams validation."""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from inferlab import SamplingParams
from inferlab.detokenizer import IncrementalDetokenizer
from inferlab.distributions import PREFIX, distributions, draw, filter_logits
from inferlab.request import Request
from inferlab.sampler import apply_penalties, request_generator

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
REPEAT = [{"role": "user", "content": "Count: one one one one one one one"}]
EOS = 2


def ids(llm, text: str) -> dict:
    return {"prompt_token_ids": llm.get_tokenizer().encode(text)}


def gen(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0] for o in outs]


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.fixture
def llm(make_llm):
    return make_llm(num_kv_blocks=128)


# --------------------------------------------------------------------------- seeds

SEEDED = SamplingParams(temperature=0.8, seed=1234, max_tokens=12)
STORY = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def seeded_alone(smol):
    from inferlab import LLM
    llm = LLM(loaded=smol, num_kv_blocks=128)
    return gen(llm, ids(llm, STORY), SEEDED)[0].token_ids


def test_seed_same_tokens_alone_and_in_mixed_batch(llm, seeded_alone):
    assert len(seeded_alone) == 12
    others = [
        (ids(llm, "The weather today is"), SamplingParams(temperature=1.0, seed=7, max_tokens=10)),
        (ids(llm, "My favourite food is"), SamplingParams(temperature=1.2, max_tokens=14)),
        (ids(llm, STORY), SamplingParams(temperature=0, max_tokens=12)),
        (ids(llm, STORY), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=6)),
    ]
    prompts = [p for p, _ in others]
    params = [s for _, s in others]
    # the seeded request in the middle of the batch, and the same prompt unseeded next to it
    prompts.insert(2, ids(llm, STORY))
    params.insert(2, SEEDED)
    outs = gen(llm, prompts, params)
    assert outs[2].token_ids == seeded_alone


def test_seed_same_tokens_after_preemption(make_llm, seeded_alone):
    llm = make_llm(num_kv_blocks=14, block_size=4)
    engine = llm.engine
    preempted_at: list[int] = []
    original = engine.scheduler._preempt

    def spy(req, out):
        if req.request_id == "seeded":
            preempted_at.append(req.num_output_tokens)
        original(req, out)

    engine.scheduler._preempt = spy
    for i, text in enumerate(["The weather today is", "My favourite food is", "Paris is a city"]):
        engine.add_request(f"g{i}", ids(llm, text), SamplingParams(temperature=0, max_tokens=12))
    # FCFS preempts the latest arrival first: the seeded request
    req = engine.add_request("seeded", ids(llm, STORY), SEEDED)
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert engine.scheduler.num_preemptions > 0
    assert any(n > 0 for n in preempted_at), f"seeded request not preempted mid-generation: {preempted_at}"
    assert req.output_token_ids == seeded_alone


def test_n_completions_are_the_prompt_submitted_n_times(llm, seeded_alone):
    """`n` in LLM.generate: one RequestOutput holding n completions, index j the prompt run with seed + j
    (as the server seeds its n choices), beside other prompts; greedy ones all alike; nothing held after."""
    three = replace(SEEDED, n=3)
    outs = llm.generate([ids(llm, "The weather today is"), ids(llm, STORY)],
                        [SamplingParams(temperature=0, max_tokens=5, n=2), three], use_tqdm=False)
    greedy, sampled = outs
    assert [c.index for c in sampled.outputs] == [0, 1, 2] and sampled.outputs[0].token_ids == seeded_alone
    for j in (1, 2):
        alone = gen(llm, [ids(llm, STORY)], [replace(SEEDED, seed=SEEDED.seed + j)])[0]
        assert sampled.outputs[j].token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for c in sampled.outputs}) == 3
    assert len(greedy.outputs) == 2 and greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert sampled.prompt_token_ids == ids(llm, STORY)["prompt_token_ids"]
    assert llm.llm_engine is llm.engine  # vLLM's name for it
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_different_seeds_differ_and_unseeded_varies(llm, make_llm, seeded_alone):
    seeds = [SamplingParams(temperature=0.8, seed=s, max_tokens=12) for s in (1, 2, 3)]
    outs = gen(llm, [ids(llm, STORY)] * 3, seeds)
    by_seed = [tuple(o.token_ids) for o in outs] + [tuple(seeded_alone)]
    assert len(set(by_seed)) == 4, "different seeds gave the same tokens"
    # An unseeded request draws its seed from the engine's generator (EngineConfig.seed): seeded
    # here, so the test is deterministic and fails only if unseeded requests shared one stream.
    hot = SamplingParams(temperature=2.0, max_tokens=8)
    first = [tuple(o.token_ids) for o in gen(make_llm(num_kv_blocks=128, seed=1234), [ids(llm, STORY)] * 3, [hot] * 3)]
    again = gen(make_llm(num_kv_blocks=128, seed=1234), [ids(llm, STORY)] * 3, [hot] * 3)
    assert [tuple(o.token_ids) for o in again] == first
    assert len(set(first)) == 3, "unseeded requests repeated each other"


def test_every_bit_of_the_seed_counts(llm):
    """PyTorch's CPU generator keeps only a seed's low 32 bits; seeds differing above them must differ."""
    def tokens(seed: int) -> list[int]:
        return gen(llm, ids(llm, STORY), SamplingParams(temperature=1.0, seed=seed, max_tokens=10))[0].token_ids
    low = tokens(1)
    assert tokens(1) == low
    assert tokens(2**32 + 1) != low
    assert tokens(2**63 - 2**32 + 1) != low


# --------------------------------------------------------------------------- top-k / top-p / min-p

def test_degenerate_filters_equal_greedy(llm):
    variants = [SamplingParams(temperature=0, max_tokens=12),
                SamplingParams(temperature=1.0, top_k=1, max_tokens=12),
                SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12),
                SamplingParams(temperature=1.0, min_p=1.0, max_tokens=12),
                SamplingParams(temperature=1.0, seed=0, max_tokens=12)]  # control: sampling differs
    outs = gen(llm, [ids(llm, STORY)] * len(variants), variants)
    greedy = outs[0].token_ids
    assert len(greedy) == 12
    for name, o in zip(["top_k=1", "top_p=1e-6", "min_p=1"], outs[1:4]):
        assert o.token_ids == greedy, name
    assert outs[4].token_ids != greedy


def test_filter_logits_unit():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0],
                           [1.0, 1.0, 0.5, -1.0, -3.0],
                           [0.0, -20.0, -21.0, -1.0, -2.0]])
    probs = logits.softmax(-1)

    def kept(top_k, top_p, min_p):
        out = filter_logits(logits.clone(), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p))
        assert torch.equal(out[out.isfinite()], logits[out.isfinite()])  # kept logits unchanged
        return [sorted(torch.nonzero(row.isfinite()).flatten().tolist()) for row in out]

    # top-k keeps exactly k (rows independent; 0 = off)
    assert kept([2, 3, 0, 1], [1.0] * 4, [0.0] * 4) == [[0, 1], [2, 3, 4], [0, 1, 2, 3, 4], [0]]
    # top-p: the smallest prefix reaching p; the token that crosses p is kept
    p0 = probs[0].tolist()  # 0.636, 0.234, 0.086, ...
    assert kept([0] * 4, [p0[0] - 0.01, p0[0] + 0.01, 1.0, 1.0], [0.0] * 4)[:2] == [[0], [3, 4]]
    assert kept([0] * 4, [p0[0] + p0[1] + 0.01] * 4, [0.0] * 4)[0] == [0, 1, 2]
    # top_p = 1 is off: even a token with probability ~1e-9 stays
    assert kept([0] * 4, [1.0] * 4, [0.0] * 4)[3] == [0, 1, 2, 3, 4]
    # min-p drops tokens whose probability is below min_p * the top probability
    mp = 0.3
    expect = [sorted(torch.nonzero(probs[i] >= mp * probs[i].max()).flatten().tolist()) for i in range(4)]
    assert kept([0] * 4, [1.0] * 4, [mp] * 4) == expect
    assert kept([0] * 4, [1.0] * 4, [mp, 0.0, 0.0, 0.0])[1:] == [[0, 1, 2, 3, 4]] * 3
    # top-p acts on the top-k survivors renormalized (vLLM/HF order): top-2 of row 0 is
    # [0.731, 0.269], so p=0.7 keeps only the first token
    assert kept([2, 0, 0, 0], [0.7, 1.0, 1.0, 1.0], [0.0] * 4)[0] == [0]
    # and on min-p's survivors renormalized (vLLM V1's order; HF's, min-p last, keeps {0, 1, 2} here):
    # min_p 0.25 keeps [.40, .30, .12] -> [.488, .366, .146], whose first two reach top_p 0.8
    six = torch.tensor([[0.40, 0.30, 0.12, 0.08, 0.06, 0.04]]).log()
    out = filter_logits(six, torch.tensor([0]), torch.tensor([0.8]), torch.tensor([0.25]))
    assert torch.nonzero(out[0].isfinite()).flatten().tolist() == [0, 1]


def sorted_whole(logits, top_k, top_p, min_p):
    """The definition filter_logits keeps: every row sorted whole, then the same rules."""
    vocab = logits.shape[-1]
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    min_logit = sorted_logits[:, :1] + torch.log(min_p.clamp(min=1e-30))[:, None]
    floor = torch.where(min_p[:, None] > 0, min_logit, torch.full_like(min_logit, float("-inf")))
    kth = torch.maximum(sorted_logits.gather(-1, (k - 1)[:, None]), floor)  # min-p, then top-k
    probs_sorted = sorted_logits.masked_fill(sorted_logits < kth, float("-inf")).softmax(-1)
    keep = ((probs_sorted.cumsum(-1) - probs_sorted) < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True
    threshold = torch.maximum(kth, sorted_logits.gather(-1, keep.sum(-1, keepdim=True) - 1))
    return logits.masked_fill(logits < threshold, float("-inf"))


def test_filter_logits_keeps_what_sorting_each_row_whole_keeps():
    """The cut-offs read from a row's largest few values (a full sort only where top-p reaches past
    them) keep exactly the tokens the whole sort keeps: peaked and flat rows, ties at the cut-off,
    banned (-inf) tokens, top_k below, at and past the prefix, with top-p and min-p."""
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 3000, 400
    scale = torch.tensor([0.3, 1.0, 3.0, 8.0]).repeat(rows // 4)[:, None]
    logits = torch.randn(rows, vocab, generator=gen) * scale
    logits[::3] = (logits[::3] * 2).round() / 2  # ties
    logits[::5, ::7] = float("-inf")
    pick = lambda options: torch.tensor(options)[torch.randint(len(options), (rows,), generator=gen)]  # noqa: E731
    top_k = pick([0, 0, 1, 5, 255, 256, 257, 2000, 2999, 5000])
    top_p = pick([1.0, 1.0, 0.5, 0.9, 0.95, 0.999, 1e-6])
    min_p = pick([0.0, 0.0, 0.0, 0.05])
    got = filter_logits(logits.clone(), top_k, top_p, min_p).isfinite()
    want = sorted_whole(logits.clone(), top_k, top_p, min_p).isfinite()
    assert torch.equal(got, want), torch.nonzero((got != want).any(-1)).flatten().tolist()
    kept, by_p = got.sum(-1), (top_p < 1) & (top_k == 0)
    assert bool((kept[by_p] < PREFIX).any() and (kept[by_p] > PREFIX).any())  # both ways were taken


@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_draws_follow_the_filtered_softmax(shape):
    """20,000 draws from one row's distribution under each filter (peaked: the kept tokens among the
    row's largest few, drawn over those; flat: past them, drawn over the whole vocabulary) follow
    softmax(filter_logits(logits / T)) within a total-variation distance of 0.03 (over 20 bins of
    the tokens by probability), and never pick a token the filters dropped."""
    gen, sparse = torch.Generator().manual_seed(1), []
    logits = torch.randn(1, 4000, generator=gen) * (4.0 if shape == "peaked" else 0.3)
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=50),
                   SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, min_p=0.2),
                   SamplingParams(temperature=1.3, top_k=300, top_p=0.8, min_p=0.01)):
        want = filter_logits(logits / params.temperature, torch.tensor([params.top_k]),
                             torch.tensor([params.top_p]), torch.tensor([params.min_p])).softmax(-1)[0]
        (probs, ids), = distributions(logits.clone(), [params])
        sparse.append(ids is not None)
        rng = request_generator(0, torch.device("cpu"))
        counts = Counter(draw(probs, rng) for _ in range(20000))
        tokens = Counter({(int(ids[t]) if ids is not None else t): c for t, c in counts.items()})
        assert all(want[t] > 0 for t in tokens), params
        # the tokens by probability in 20 bins of equal mass (a flat row's 4,000 would each be noise)
        order = want.argsort(descending=True)
        bins = (want[order].cumsum(0) * 20).clamp(max=19.999).long()
        got = torch.zeros(20).index_add_(0, bins, torch.tensor([tokens[int(t)] / 20000 for t in order]))
        assert 0.5 * float((got - torch.zeros(20).index_add_(0, bins, want[order])).abs().sum()) < 0.03, params
    assert (shape == "peaked") in sparse  # the prefix's draw taken for a peaked row, the whole row's for a flat one


@pytest.mark.parametrize("vocab", [100, 4000])  # below and past the largest values looked at first
def test_a_rows_distribution_is_the_same_alone_and_in_a_batch(vocab):
    """Whatever the other rows ask for (a filter of their own makes the sampler take their largest
    values first), each row's weights and token order are those it gets alone: a seeded request's
    draw depends on its own row only."""
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0.9), SamplingParams(temperature=0.9, min_p=0.1),
              SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=0.9, top_k=5)]
    together = distributions(logits.clone(), params)
    for i, (probs, ids) in enumerate(together):
        alone, alone_ids = distributions(logits[i:i + 1].clone(), params[i:i + 1])[0]
        assert torch.equal(probs, alone) and (ids is None) == (alone_ids is None), params[i]
        assert ids is None or torch.equal(ids, alone_ids)


# --------------------------------------------------------------------------- penalties

def test_apply_penalties_unit():
    prompt = [1, 2]
    row = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.5, 4.0])

    def run(output: list[int], **kw) -> torch.Tensor:
        req = Request("r", prompt, SamplingParams(**kw), 0.0)
        req.token_ids.extend(output)
        out = row.clone()
        apply_penalties(out, req)
        return out

    # repetition: seen prompt+output tokens (1, 2, 3, 3): positive / p, negative * p
    got = run([3, 3], repetition_penalty=2.0)
    assert torch.allclose(got, torch.tensor([2.0, -4.0, 1.5, -2.0, 0.5, 4.0]))
    # presence and frequency: output tokens only (3 twice, 5 once); the prompt is not counted
    got = run([3, 5, 3], presence_penalty=0.5, frequency_penalty=0.25)
    assert torch.allclose(got, torch.tensor([2.0, -2.0, 3.0, -1.0 - 0.5 - 0.5, 0.5, 4.0 - 0.5 - 0.25]))
    got = run([], presence_penalty=1.0, frequency_penalty=1.0)  # nothing generated yet
    assert torch.equal(got, row)


def test_a_penalty_window_reads_the_last_tokens_of_prompt_and_output():
    """llama.cpp's and Ollama's repeat_last_n: all three penalties count the last N tokens alone."""
    row = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.5, 4.0])
    req = Request("r", [1, 2, 5], SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
                                                 penalty_last_n=3), 0.0)
    req.token_ids.extend([3, 5])  # the window: 5 (the prompt's), 3, 5; tokens 1 and 2 fall out
    got = row.clone()
    apply_penalties(got, req)
    assert torch.allclose(got, torch.tensor([2.0, -2.0, 3.0, -2.0 - 0.75, 0.5, 2.0 - 0.5 - 0.5]))
    off = Request("r", [1, 2], SamplingParams(repetition_penalty=2.0, penalty_last_n=0), 0.0)
    assert not off.params.has_penalties  # a window of none
    with pytest.raises(ValueError, match="penalty_last_n must be -1"):
        SamplingParams(penalty_last_n=-2)


def penalised(row: torch.Tensor, req: Request) -> torch.Tensor:
    """The definition: the whole history counted afresh, the penalties applied over the whole row."""
    p, out, vocab = req.params, row.clone(), row.shape[-1]
    seen = torch.tensor(sorted({t for t in req.token_ids if t < vocab}), dtype=torch.long)
    vals = out[seen]
    out[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    counts = torch.bincount(torch.tensor(req.output_token_ids), minlength=vocab)[:vocab].to(out.dtype)
    return out - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype))


def test_penalties_kept_between_steps_equal_a_fresh_count():
    """The counts a request keeps between steps (a step reads only its new tokens) penalise exactly
    as counting its whole history afresh does, as tokens come one or several at a time, repeated
    and new, past the first 64 distinct ones, and some past the logits' width (an added token)."""
    rng = random.Random(0)
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    row = torch.randn(300, generator=torch.Generator().manual_seed(0))
    req = Request("r", [rng.randrange(310) for _ in range(40)], params, 0.0)
    for _ in range(60):
        req.token_ids.extend(rng.randrange(310) for _ in range(rng.choice([1, 1, 3])))
        got = row.clone()
        apply_penalties(got, req)
        assert torch.equal(got, penalised(row, req))
    assert len(req.penalty_counts.slot) > 64 and req.penalty_counts.largest >= 300


def test_penalties_reduce_repetition_end_to_end(llm):
    base = dict(temperature=0, max_tokens=16)
    params = [SamplingParams(**base), SamplingParams(**base, repetition_penalty=1.5),
              SamplingParams(**base, frequency_penalty=2.0), SamplingParams(**base, presence_penalty=2.0)]
    outs = llm.chat([REPEAT] * len(params), params, use_tqdm=False)
    plain, *penalized = [o.outputs[0].token_ids for o in outs]
    assert repeats(plain) >= 4, f"greedy continuation should repeat itself: {outs[0].outputs[0].text!r}"
    for p, toks in zip(params[1:], penalized):
        assert repeats(toks) < repeats(plain), p


# --------------------------------------------------------------------------- stop rules

@pytest.fixture(scope="module")
def fox(smol):
    """Greedy reference continuation of a short prompt."""
    from inferlab import LLM
    llm = LLM(loaded=smol, num_kv_blocks=128)
    out = gen(llm, ids(llm, "The quick brown fox"), SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    return out


def test_stop_string_and_stop_token(llm, fox):
    tok = llm.get_tokenizer()
    stop = tok.decode(fox.token_ids[3:5])  # two tokens' text in the middle
    cut = fox.text.index(stop)
    assert cut == len(tok.decode(fox.token_ids[:3])) and cut + len(stop) < len(fox.text)
    stop_id = fox.token_ids[4]
    assert stop_id not in fox.token_ids[:4]
    prompt = ids(llm, "The quick brown fox")
    params = [SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=12, stop=["never appears", stop],
                             include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id])]
    plain, incl, by_id = gen(llm, [prompt] * 3, params)
    assert (plain.finish_reason, plain.stop_reason, plain.text) == ("stop", stop, fox.text[:cut])
    assert plain.token_ids == fox.token_ids[:5]
    assert (incl.finish_reason, incl.stop_reason, incl.text) == ("stop", stop, fox.text[:cut + len(stop)])
    assert (by_id.finish_reason, by_id.stop_reason, by_id.token_ids) == ("stop", stop_id, fox.token_ids[:5])


def test_stop_token_text_excluded_like_vllm(llm, fox):
    tok = llm.get_tokenizer()
    stop_id = fox.token_ids[4]
    out = gen(llm, ids(llm, "The quick brown fox"),
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    assert out.text == tok.decode(fox.token_ids[:4])


def test_eos_ignore_eos_max_tokens_min_tokens(llm):
    params = [SamplingParams(temperature=0, max_tokens=16),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5),
              SamplingParams(temperature=0, max_tokens=16, min_tokens=12)]
    plain, no_eos, short, min_t = [o.outputs[0] for o in llm.chat([FRANCE] * 4, params, use_tqdm=False)]
    assert llm.get_tokenizer().eos_token_ids == {EOS, 0}  # <|im_end|>, and <|endoftext|> as llama.cpp ends on it
    assert "Paris" in plain.text
    assert (plain.finish_reason, plain.stop_reason, len(plain.token_ids)) == ("stop", None, 8)
    assert plain.token_ids[-1] == EOS
    # ignore_eos: runs through EOS to max_tokens
    assert (no_eos.finish_reason, len(no_eos.token_ids)) == ("length", 12)
    assert no_eos.token_ids[:8] == plain.token_ids
    # max_tokens: exactly that many
    assert (short.finish_reason, short.token_ids) == ("length", plain.token_ids[:5])
    # min_tokens: EOS is banned until 12 tokens exist
    assert len(min_t.token_ids) >= 12
    assert EOS not in min_t.token_ids[:12]
    assert min_t.token_ids[:7] == plain.token_ids[:7]


# --------------------------------------------------------------------------- streaming

def _stream(engine, prompt, params):
    engine.add_request("s", prompt, params)
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].new_text)
            final = out
    assert final is not None and final.finished
    return deltas, final.outputs[0]


def test_streaming_deltas_concatenate_to_text(llm, fox):
    deltas, out = _stream(llm.engine, ids(llm, "The quick brown fox"), SamplingParams(temperature=0, max_tokens=12))
    assert out.token_ids == fox.token_ids
    assert "".join(deltas) == out.text == fox.text


def test_streaming_with_stop_never_leaks(llm, fox):
    tok = llm.get_tokenizer()
    stop = tok.decode(fox.token_ids[3:5])
    cut = fox.text.index(stop)
    # a second stop that matches the opening text for a while, so that text is held back
    # and later released
    decoy = fox.text[:cut] + "!!"
    params = SamplingParams(temperature=0, max_tokens=12, stop=[decoy, stop])
    deltas, out = _stream(llm.engine, ids(llm, "The quick brown fox"), params)
    assert out.text == fox.text[:cut] and out.stop_reason == stop
    assert "".join(deltas) == out.text
    sent = ""
    for d in deltas:
        sent += d
        assert out.text.startswith(sent), f"delta leaked text past the stop: {sent!r}"
    assert "" in deltas[:-1], "expected some text to be held back while it could start a stop"


MULTIBYTE = "Café naïve — 日本語のテキスト, 中文 🎉👍🏽 ok ñ"


def _feed(tok, prompt, out_ids, stops=(), include=False):
    d = IncrementalDetokenizer(tok, prompt, list(stops), include)
    deltas, stop = [], None
    for i, t in enumerate(out_ids):
        before = len(d.text)
        d.add_token(t)
        stop = d.find_stop(len(d.text) - before)
        last = stop is not None or i == len(out_ids) - 1
        if last and stop is None:
            d.flush_pending()
        deltas.append(d.pop_delta(last))
        if stop is not None:
            break
    return d, deltas, stop


def test_incremental_detokenizer_multibyte(smol):
    tok = smol[1]
    out_ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in out_ids), "text should split characters over tokens"
    prompt = tok.encode("Say something:")
    d, deltas, _ = _feed(tok, prompt, out_ids)
    assert "".join(deltas) == d.text == tok.decode(out_ids) == MULTIBYTE
    assert not any("\ufffd" in x for x in deltas)
    # same with a stop string that is never hit but whose prefixes keep appearing
    d, deltas, stop = _feed(tok, prompt, out_ids, stops=["日本語は", "🎉👎"])
    assert stop is None and "".join(deltas) == tok.decode(out_ids)
    assert not any("\ufffd" in x for x in deltas)
    # and one that is hit inside the multi-byte text
    d, deltas, stop = _feed(tok, prompt, out_ids, stops=["中文 🎉"])
    assert stop == "中文 🎉" and "".join(deltas) == d.text == MULTIBYTE[:MULTIBYTE.index(stop)]


@pytest.mark.parametrize("ends", ["length", "eos"])
def test_a_stop_string_in_the_held_back_end_of_an_answer_still_stops_it(smol, ends):
    """An answer whose last token is half a character ends in the U+FFFD that piece decodes to; that
    text, flushed at the end, is searched for stop strings as the rest is."""
    from inferlab.output_processor import OutputProcessor
    from inferlab.request import Request, RequestStatus
    from inferlab.sampler import SampleResult
    tok = smol[1]
    half = next(t for t in tok.encode("🎉", add_special_tokens=False) if tok.decode([t]) == "\ufffd")
    eos = tok.eos_token_id
    prompt = tok.encode("Say:")
    params = SamplingParams(max_tokens=2 if ends == "length" else 8, stop=["\ufffd"])
    req = Request("r", prompt, params, 0.0, max_tokens=params.max_tokens)
    proc = OutputProcessor(tok, {eos}, lambda: 0.0)
    proc.add(req)
    out_ids = [tok.encode("ok", add_special_tokens=False)[0], half] + ([eos] if ends == "eos" else [])
    req.token_ids += out_ids
    emitted, status = proc.emit(req, [SampleResult(t) for t in out_ids])
    assert status == RequestStatus.FINISHED_STOPPED and req.stop_reason == "\ufffd"
    req.status = status
    out = proc.make_output(req, emitted).outputs[0]
    assert out.text == tok.decode(out_ids[:1]) and "\ufffd" not in out.text


def test_incremental_detokenizer_holds_back_longer_stop_prefix(smol):
    """Two stops where the first lowers the release point: the second's longer prefix ("cd"
    of "cdbq") must still be held back, or it leaks and the stream disagrees with the text."""
    tok = smol[1]
    out_ids = [t for c in "xacdbq" for t in tok.encode(c, add_special_tokens=False)]
    d, deltas, stop = _feed(tok, tok.encode("Hi"), out_ids, stops=["bz", "cdbq"])
    assert stop == "cdbq" and d.text == "xa"
    assert "".join(deltas) == "xa", deltas


# --------------------------------------------------------------------------- logprobs

def test_logprobs_match_log_softmax_of_logits(llm, monkeypatch):
    model = llm.engine.model
    captured: list[torch.Tensor] = []
    original = model.compute_logits

    def spy(hidden):
        logits = original(hidden)
        captured.append(logits.detach().clone())
        return logits

    monkeypatch.setattr(model, "compute_logits", spy)
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode(llm.get_tokenizer().apply_chat_template(FRANCE))}
    for params in [SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                   SamplingParams(temperature=0.8, seed=5, max_tokens=6, logprobs=3, repetition_penalty=1.3)]:
        captured.clear()
        out = gen(llm, prompt, params)[0]
        assert len(out.logprobs) == len(out.token_ids) == len(captured) == 6
        total = 0.0
        for step, token, logits in zip(out.logprobs, out.token_ids, captured):
            ref = logits[0].log_softmax(-1)  # raw model logprobs (vLLM's default)
            assert len(step) >= 3 and token in step
            assert all(v <= 0 for v in step.values())
            top3 = ref.topk(3).indices.tolist()
            assert set(top3) <= set(step)
            for t, v in step.items():
                assert math.isclose(v, float(ref[t]), abs_tol=1e-4), (t, v, float(ref[t]))
            if params.greedy:
                assert token == max(step, key=step.get) == top3[0]
            total += step[token]
        assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6, abs_tol=1e-6)


def test_logprobs_consistent_between_3_and_20(llm):
    outs = llm.chat([FRANCE] * 3, [SamplingParams(temperature=0, max_tokens=4, logprobs=n) for n in (3, 20, 0)],
                    use_tqdm=False)
    three, twenty, zero = [o.outputs[0] for o in outs]
    for a, b, c, tok in zip(three.logprobs, twenty.logprobs, zero.logprobs, three.token_ids):
        assert len(a) == 3 and len(b) == 20 and c.keys() == {tok}
        best20 = sorted(b, key=b.get, reverse=True)[:3]
        assert set(a) == set(best20)
        assert all(math.isclose(a[t], b[t], abs_tol=1e-5) for t in a)
        assert math.isclose(c[tok], a[tok], abs_tol=1e-5)
        assert sum(math.exp(v) for v in b.values()) <= 1.0 + 1e-5
    assert math.isclose(three.cumulative_logprob, zero.cumulative_logprob, abs_tol=1e-4)


def test_logprobs_answer_vllms_fields(llm, monkeypatch):
    """Each entry is a float (InferLab's shape) and a vLLM Logprob: .logprob, .rank (1 + how many
    tokens were likelier that step, the sampled one's too), .decoded_token."""
    model, captured = llm.engine.model, []
    original = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda hidden: captured.append(original(hidden)) or captured[-1])
    tok = llm.get_tokenizer()
    out = gen(llm, {"prompt_token_ids": tok.encode(tok.apply_chat_template(FRANCE))},
              SamplingParams(temperature=1.5, seed=3, max_tokens=8, logprobs=2))[0]
    for step, token, logits in zip(out.logprobs, out.token_ids, captured, strict=True):
        ref = logits[0].log_softmax(-1)
        for t, lp in step.items():
            assert lp.logprob == float(lp) and lp.decoded_token == tok.decode([t], skip_special_tokens=False)
            assert lp.rank == int((ref > ref[t]).sum()) + 1, (t, lp.rank)
        assert sorted(lp.rank for t, lp in step.items() if t != token or len(step) == 2) == [1, 2]
    assert any(step[token].rank > 2 for step, token in zip(out.logprobs, out.token_ids))  # one sampled off the top


def test_chat_takes_a_template_of_ones_own_and_tokenize_as_transformers(llm):
    tok = llm.get_tokenizer()
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    out = llm.chat(FRANCE, SamplingParams(max_tokens=1), chat_template=plain, use_tqdm=False)[0]
    assert out.prompt == "user: What is the capital of France?\n"
    assert tok.apply_chat_template(FRANCE, tokenize=True) == tok.encode(tok.apply_chat_template(FRANCE),
                                                                        add_special_tokens=False)
    assert tok.eos_token_id in tok.eos_token_ids
    with pytest.raises(ValueError, match="the chat_template given is empty"):
        llm.chat(FRANCE, chat_template="", use_tqdm=False)


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(stop=["a\ud800"]), "stop strings must be valid Unicode text"),  # taken, and never matched
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(n=0), "n"),
    (dict(n=1.5), "n"),
    (dict(temperature="0.5"), "temperature"),  # a type error inside the checks before
    (dict(top_p=None), "top_p"),
    (dict(logprobs=2.5), "logprobs"),  # passed, then failed inside a step (topk's k)
    (dict(logprobs=True), "logprobs"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(seed=1.5), "seed"),
    (dict(top_k=2.0), "top_k"),
    (dict(min_tokens=None), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop=["x"] * 17), "stop"),
    (dict(stop="x" * 257), "stop"),
    (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
    (dict(logit_bias={5: 100.5}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias"),
])
def test_sampling_params_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, logprobs=20, stop=["a"])
    SamplingParams(stop=["s" * 256] * 16, stop_token_ids=list(range(1024)), logit_bias={5: -100, 6: 100})
    assert SamplingParams(top_k=-1).top_k == 0
    numpy = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(4), n=np.int64(2))
    assert (numpy.temperature, numpy.top_k, numpy.max_tokens, numpy.n) == (0.5, 3, 4, 2)
    assert type(numpy.temperature) is float and type(numpy.top_k) is int  # as Python's, for JSON and torch


def test_huge_top_k_means_all_tokens(llm):
    """top_k past the vocabulary (even past int64) keeps everything instead of overflowing."""
    p = {"prompt_token_ids": [504, 3575, 282, 4649, 314]}
    big = llm.generate(p, SamplingParams(temperature=0.9, top_k=2**70, seed=5, max_tokens=6), use_tqdm=False)[0]
    off = llm.generate(p, SamplingParams(temperature=0.9, seed=5, max_tokens=6), use_tqdm=False)[0]
    assert big.outputs[0].token_ids == off.outputs[0].token_ids


def test_logit_bias_bans_and_forces_tokens(llm):
    greedy = gen(llm, ids(llm, STORY), SamplingParams(temperature=0, max_tokens=4))[0].token_ids
    banned = gen(llm, ids(llm, STORY), SamplingParams(temperature=0, max_tokens=4, logit_bias={greedy[0]: -100}))[0]
    assert banned.token_ids[0] != greedy[0]
    forced = gen(llm, ids(llm, STORY), SamplingParams(temperature=0.7, seed=3, max_tokens=4, logit_bias={42: 100}))[0]
    assert forced.token_ids == [42] * 4
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(ids(llm, STORY), SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)


# --------------------------------------------------------------------------- vLLM's token restrictions

def test_allowed_token_ids_and_bad_words_rule_tokens_out(llm, fox):
    """allowed_token_ids: only those drawn, greedy and sampled; bad_words: a word's tokens never end
    the output, as vLLM bans them (its last token where the ones before it were just written)."""
    prompt, tok = ids(llm, "The quick brown fox"), llm.get_tokenizer()
    allowed = sorted(set(fox.token_ids[5:9]))  # the greedy answer's own tokens, but not its first ones
    greedy, drawn = gen(llm, [prompt] * 2, [SamplingParams(temperature=0, max_tokens=8, allowed_token_ids=allowed),
                                            SamplingParams(temperature=1, seed=3, max_tokens=8,
                                                           allowed_token_ids=allowed)])
    assert set(greedy.token_ids) <= set(allowed) and set(drawn.token_ids) <= set(allowed)
    word = tok.decode(fox.token_ids[1:3]).strip()  # a word of two tokens from the greedy answer
    assert len(tok.encode(" " + word, add_special_tokens=False)) == 2
    banned, plain = gen(llm, [prompt] * 2, [SamplingParams(temperature=0, max_tokens=12, bad_words=[word]),
                                            SamplingParams(temperature=0, max_tokens=12)])
    assert word in plain.text and word not in banned.text and banned.token_ids[:1] == fox.token_ids[:1]
    assert plain.token_ids == fox.token_ids  # a request beside them is untouched


def test_skip_special_tokens_false_keeps_them_in_the_text(llm):
    """Past its end token (ignore_eos), the answer holds one: in the text where it is kept. (The token
    that ends an answer is not text either way, as vLLM's.)"""
    kept, skipped = [o.outputs[0] for o in llm.chat([FRANCE] * 2, [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, skip_special_tokens=False),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)], use_tqdm=False)]
    assert kept.token_ids == skipped.token_ids and EOS in kept.token_ids[:-1]
    assert "Paris.<|im_end|>" in kept.text
    assert kept.text.replace("<|im_end|>", "").replace("<|im_start|>", "") == skipped.text


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    long = ids(llm, "Some words before it all. The quick brown fox")["prompt_token_ids"]
    greedy = dict(temperature=0, max_tokens=12)
    cut, whole, last = llm.generate([{"prompt_token_ids": long}] * 2 + [{"prompt_token_ids": long[-4:]}], [
        SamplingParams(**greedy, truncate_prompt_tokens=4), SamplingParams(**greedy, truncate_prompt_tokens=-1),
        SamplingParams(**greedy)], use_tqdm=False)
    assert cut.prompt_token_ids == long[-4:] and cut.outputs[0].token_ids == last.outputs[0].token_ids
    assert whole.prompt_token_ids == long
    for bad, words in [({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1"),
                       ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
                       ({"bad_words": [" "]}, "bad_words must be a list of words"),
                       ({"skip_special_tokens": "no"}, "skip_special_tokens must be True or False")]:
        with pytest.raises(ValueError, match=words):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match=r"allowed_token_ids has a token id outside the vocabulary \[0, 49152\)"):
        llm.generate("hi", SamplingParams(allowed_token_ids=[49152]), use_tqdm=False)


def test_rules_that_leave_no_token_fail_that_request_alone(llm, fox):
    """allowed_token_ids outside what a grammar takes, greedy or sampled: the request fails with why
    (it drew an arbitrary token before), and one beside it answers as alone."""
    from inferlab import StructuredOutputsParams
    yes_no = StructuredOutputsParams(choice=["yes", "no"])
    prompt = ids(llm, "The quick brown fox")
    outs = llm.generate([prompt] * 3, [
        SamplingParams(temperature=0, max_tokens=5, allowed_token_ids=[100, 200], structured_outputs=yes_no),
        SamplingParams(temperature=1, max_tokens=5, allowed_token_ids=[100, 200], structured_outputs=yes_no),
        SamplingParams(temperature=0, max_tokens=12)], use_tqdm=False)
    for out in outs[:2]:
        assert out.outputs[0].finish_reason == "error" and "no token is left to draw" in out.error
        assert out.outputs[0].token_ids == []
    assert outs[2].outputs[0].token_ids == fox.token_ids
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
