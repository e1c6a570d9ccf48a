"""Speculative decoding: n-gram and draft-model proposers, verified by rejection sampling in the engine.

Greedy output must be the same token for token with speculation on or off (whatever the batch, the
cache and the pool do), random sampling must keep the target's distribution, and rejected drafts
must never reach the prefix cache or break the pool's invariants."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from inferlab import SamplingParams
from inferlab.allocation import OutOfKVMemoryError
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine
from inferlab.metrics import EngineMetrics
from inferlab.model.llama import LlamaForCausalLM, ModelArgs
from inferlab.spec_decode.config import SpeculativeConfig
from inferlab.spec_decode.ngram import propose_ngram

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "disable_by_batch_size": 64}
DRAFT = {"method": "draft_model", "model": "tiny", "num_speculative_tokens": 3, "disable_by_batch_size": 64}


def random_llama(vocab: int, seed: int, hidden: int = 32, scale: float = 0.5) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    args = ModelArgs(arch="llama", hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=hidden // 2,
                     intermediate_size=2 * hidden, vocab_size=vocab, max_position=4096, tie_word_embeddings=True)
    model = LlamaForCausalLM(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


@pytest.fixture(scope="session")
def other_draft(tiny):
    """A draft that agrees with `tiny` only part of the time: its weights plus noise."""
    model = copy.deepcopy(tiny[0])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    return model, tiny[1]


def engine(model, spec=None, draft=None, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_kv_blocks", 256)
    kwargs.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(speculative_config=spec, **kwargs), loaded=model, draft_loaded=draft)


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams, check: bool = False) -> list[list[int]]:
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if check:
            eng.check_integrity()
    return [done[f"r{i}"] for i in range(len(prompts))]


# prompts that repeat themselves (where lookup finds something), with a shared prefix for the cache
PROMPTS = [[5, 6, 7, 8, 9] * 3 + [100 + i, 101 + i, 5, 6] for i in range(6)] + [list(range(300, 340))]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_config_errors_are_one_line(tiny):
    for bad, msg in [({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
                     ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
                     ({"method": "ngram", "num_speculative_tokens": 16}, "num_speculative_tokens must be"),
                     ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                       "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
                     ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown speculative_config"),
                     ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
                     ({**DRAFT, "share_kv": "yes"}, "share_kv must be bool or None, got 'yes'"),
                     ({**DRAFT, "model": 5}, "speculative_config model must be str or None, got 5"),
                     ({**DRAFT, "int8_activations": "yes"}, "int8_activations must be bool, got 'yes'"),
                     ({**DRAFT, "disable_by_batch_size": True}, "disable_by_batch_size must be int or None"),
                     ('{"method": "ngram"', "not valid JSON")]:
        with pytest.raises(ValueError, match=msg) as e:
            EngineConfig(speculative_config=bad)
        assert "\n" not in str(e.value)
    assert SpeculativeConfig.parse('{"model": "x", "num_speculative_tokens": 2}').method == "draft_model"
    ngram = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (ngram.prompt_lookup_min, ngram.prompt_lookup_max, ngram.disable_by_batch_size) == (3, 3, 12)
    assert SpeculativeConfig.parse({"model": "x", "num_speculative_tokens": 4}).disable_by_batch_size == 2
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(1000 tokens\) differs"):
        engine(tiny, DRAFT, draft=(random_llama(1000, 0), tiny[1]))

    class Rotated:  # the same number of tokens, ids from 100 on moved by 1,000: it was taken
        vocab_size = tiny[1].vocab_size

        def id_to_token(self, i: int) -> str | None:
            return tiny[1].id_to_token(i if i < 100 else 100 + (i - 100 + 1000) % (self.vocab_size - 100))

    with pytest.raises(ValueError, match=r"draft model's token 100 is .*, the target's .*; a draft must share"):
        engine(tiny, DRAFT, draft=(random_llama(tiny[0].args.vocab_size, 0), Rotated()))
    narrow = (random_llama(tiny[0].args.vocab_size, 0, hidden=16), tiny[1])  # K/V of another shape
    with pytest.raises(ValueError, match="share_kv needs a draft whose K/V has the target's shape") as e:
        engine(tiny, SHARED, draft=narrow)
    assert "\n" not in str(e.value)
    assert "draft_kv" in engine(tiny, DRAFT, draft=narrow).snapshot()["spec_decode"]  # auto: its own pool


def test_ngram_lookup_follows_vllm():
    # the longest suffix (up to max) that occurred before wins; among equal ones the latest occurrence
    assert propose_ngram([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [9, 2]
    assert propose_ngram([2, 3, 5, 2, 3, 6, 3], 3, 1, 3) == [6, 3]
    assert propose_ngram([4, 2, 3, 8, 1, 3], 3, 1, 3) == [8, 1, 3]
    assert propose_ngram([4, 2, 3, 8, 1, 3], 3, 2, 3) == []  # only a 1-token match, below min
    assert propose_ngram([1, 2, 1, 2], 5, 2, 2) == [1, 2]  # at most what follows the match
    assert propose_ngram([7], 3, 1, 2) == []


SHARED = {**DRAFT, "share_kv": True}  # the noisy draft reads the target's K/V, as a quantized copy does
OWN_POOL = {**DRAFT, "share_kv": False}


@pytest.mark.parametrize("spec, draft", [(NGRAM, None), (DRAFT, "self"), (OWN_POOL, "self"), (DRAFT, "other"),
                                         (SHARED, "other")])
def test_greedy_identical_with_speculation(tiny, other_draft, spec, draft):
    """Batch, prefix caching (a second wave whose prompts are the first wave's whole texts), chunked
    prompts, and a pool small enough to preempt: the same tokens as without speculation. The draft
    reads the target's K/V (the target itself by default; the noisy one when told) or keeps its own."""
    draft = {None: None, "self": tiny, "other": other_draft}[draft]
    want = run(engine(tiny), PROMPTS, GREEDY)
    second = [p + o for p, o in zip(PROMPTS, want)]
    want2 = run(engine(tiny), second, GREEDY)
    eng = engine(tiny, spec, draft)
    assert run(eng, PROMPTS, GREEDY, check=True) == want
    assert run(eng, second, GREEDY, check=True) == want2
    spec_stats = eng.snapshot()["spec_decode"]
    assert spec_stats["num_accepted_tokens"] > 10, spec_stats  # drafts were accepted, several tokens a step
    if draft is other_draft:
        assert spec_stats["num_accepted_tokens"] < spec_stats["num_draft_tokens"]  # and rejected
    if draft is not None:  # its own pool shows in the snapshot; a shared one is the target's
        assert ("draft_kv" in spec_stats) == (spec is OWN_POOL or (spec is DRAFT and draft is other_draft))
    assert eng.block_manager.prefix_hits > 0
    small = engine(tiny, spec, draft, num_kv_blocks=24, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    assert run(small, PROMPTS, GREEDY, check=True) == want
    assert small.scheduler.num_preemptions > 0
    assert small.snapshot()["spec_decode"]["num_accepted_tokens"] > 0


# near-greedy (the tiny model's greedy text loops, so lookup finds drafts), some of them rejected
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.01, max_tokens=40, ignore_eos=True, seed=11),
                                    SamplingParams(temperature=0.05, top_k=3, top_p=0.9, max_tokens=40,
                                                   ignore_eos=True, seed=5)], ids=["plain", "top-k-p"])
def test_seeded_sampling_identical_with_ngram_speculation(tiny, params):
    """Verification draws each row as one-at-a-time decoding does, with the same random numbers: a
    seeded request's text is the same whether it was given drafts or not (rejection sampling drew
    differently, so only the distribution was the same)."""
    want = run(engine(tiny), PROMPTS, params)
    eng = engine(tiny, NGRAM)
    assert run(eng, PROMPTS, params, check=True) == want
    stats = eng.snapshot()["spec_decode"]
    assert 8 <= stats["num_accepted_tokens"] < stats["num_draft_tokens"], stats  # drafts kept and rejected


def test_speculation_stops_at_stop_tokens_and_max_tokens_with_logprobs(tiny):
    """Several tokens arrive in one step: the stop rules cut them exactly where one-at-a-time decoding
    stops, logprobs match, and streamed deltas add up to the final text."""
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    want = run(engine(tiny), PROMPTS[:2], base)
    stop_at = want[0][7]
    for params in [base, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2,
                                        stop_token_ids=[stop_at]),
                   SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2)]:
        outs = {}
        for eng in (engine(tiny), engine(tiny, DRAFT, tiny)):
            eng.add_request("a", {"prompt_token_ids": PROMPTS[0]}, params)
            text, ids, multi = "", [], 0
            while eng.has_unfinished_requests():
                for out in eng.step():
                    c = out.outputs[0]
                    text, ids, multi = text + c.new_text, ids + c.new_token_ids, max(multi, len(c.new_token_ids))
                    final = c
            assert ids == final.token_ids and text == final.text
            outs[eng.speculator is not None] = (final, multi)
        (plain, _), (spec, multi) = outs[False], outs[True]
        assert multi > 1  # several tokens did arrive at once
        assert spec.token_ids == plain.token_ids and spec.finish_reason == plain.finish_reason
        assert spec.text == plain.text
        for a, b in zip(spec.logprobs, plain.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert 0 < len(outs[True][0].token_ids) <= 9


def cached_prefixes(eng: LLMEngine) -> list[tuple[int, ...]]:
    """The whole token prefix each registered block stands for, read back along its parent chain."""
    bm, out = eng.block_manager, []
    for block in bm.blocks:
        if block.hash is None:
            continue
        tokens, b = [], block
        while b is not None:
            tokens[:0] = b.token_ids
            b = bm.blocks[bm.hash_to_block[b.parent]] if b.parent is not None else None
        out.append(tuple(tokens))
    return out


@pytest.mark.parametrize("config", [DRAFT, SHARED])
def test_rejected_drafts_never_enter_the_prefix_cache(tiny, other_draft, config):
    """With a draft that is often wrong and 2-token blocks, every cached block's prefix is a prefix of
    what some request really holds (prompt + output): none was registered with rejected drafts, also
    when the draft wrote its K/V into the target's blocks."""
    eng = engine(tiny, config, other_draft, block_size=2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = run(eng, PROMPTS, params, check=True)
    texts = [tuple(p + o) for p, o in zip(PROMPTS, outs)]
    stats = eng.snapshot()["spec_decode"]
    assert 0 < stats["num_accepted_tokens"] < stats["num_draft_tokens"]
    prefixes = cached_prefixes(eng)
    assert len(prefixes) > 50
    assert all(any(t[:len(p)] == p for t in texts) for p in prefixes)


def tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


@pytest.mark.parametrize("spec", ["ngram", "draft", "shared"])
def test_rejection_sampling_keeps_the_target_distribution(tiny, spec):
    """Temperature 1 over a 16-token vocabulary: the 2nd and 3rd tokens (the 1st is the prefill's, the
    next two come from one verify step when the draft is accepted) are distributed as without
    speculation. 3000 seeded requests each way: the total-variation distance stays below 0.06, where
    taking the draft's distribution instead of the target's (or accepting every draft) gives > 0.2."""
    target = (random_llama(16, seed=2, hidden=16, scale=0.6), tiny[1])
    draft = (random_llama(16, seed=3, hidden=16, scale=0.6), tiny[1])
    config = {**{"ngram": NGRAM, "draft": DRAFT, "shared": SHARED}[spec], "num_speculative_tokens": 2,
              "disable_by_batch_size": 4096}
    prompt = list(range(16)) * 2  # every token occurred before: lookup always proposes
    counts: dict[bool, list[Counter]] = {}
    for on in (False, True):
        eng = engine(target, config if on else None, draft if on else None, num_kv_blocks=4096, max_num_seqs=512)
        for i in range(3000):
            eng.add_request(f"r{i}", {"prompt_token_ids": prompt},
                            SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=i))
        pos = [Counter(), Counter()]
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    ids = out.outputs[0].token_ids
                    pos[0][ids[1]] += 1
                    pos[1][ids[2]] += 1
        counts[on] = pos
        if on:
            s = eng.snapshot()["spec_decode"]
            assert s["num_drafts"] > 2500 and 0 < s["num_accepted_tokens"] < s["num_draft_tokens"]
    for j in range(2):
        assert tv(counts[False][j], counts[True][j]) < 0.06


@pytest.mark.parametrize("draft", ["point mass", "distribution"])
def test_rejection_sampler_is_exact_on_known_distributions(draft):
    """Fixed target rows p1, p2 over 6 tokens and drafts that p likes (p(d) = 0.5, where a wrong
    residual biases the output by 0.25): the first emitted token follows p1 and, once d1 is accepted,
    the second follows p2 (4,000 draws, TV < 0.05; the noise is about 0.015)."""
    from inferlab.request import Request
    from inferlab.sampler import request_generator
    from inferlab.spec_decode.rejection import accepted_tokens
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.5, 0.1, 0.1, 0.1, 0.1], [1 / 6] * 6])
    q = torch.tensor([[0.3, 0.1, 0.3, 0.1, 0.1, 0.1], [0.2, 0.3, 0.1, 0.2, 0.1, 0.1]])
    req = Request("r", [1], SamplingParams(temperature=1.0), 0.0)
    req.generator = request_generator(7, torch.device("cpu"))
    first, second = Counter(), Counter()
    for _ in range(4000):
        if draft == "point mass":
            req.spec_token_ids, req.spec_probs = [0, 1], None
        else:  # drafts drawn from q, as a draft model does
            req.spec_token_ids = [int(torch.multinomial(q[j], 1, generator=req.generator)) for j in range(2)]
            req.spec_probs = q
        tokens = accepted_tokens(p.log(), req)
        first[tokens[0]] += 1
        if tokens[0] == req.spec_token_ids[0]:
            second[tokens[1]] += 1
    for counts, row in ((first, p[0]), (second, p[1])):
        n = sum(counts.values())
        assert 0.5 * sum(abs(counts[t] / n - float(row[t])) for t in range(6)) < 0.05


action = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 12), st.integers(2, 24), st.booleans(), st.booleans()),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=6, max_size=30),
       spec=st.sampled_from(["ngram", "self", "self-own", "other", "other-shared"]),
       num_blocks=st.integers(10, 24), block_size=st.sampled_from([2, 4]), budget=st.sampled_from([8, 32, 256]),
       caching=st.booleans(), prefix_cache=st.sampled_from(["hash", "radix"]),
       preemption=st.sampled_from(["recompute", "swap"]), allocation=st.sampled_from(["paged", "paged", "reserve"]),
       k=st.integers(1, 5))
def test_random_traffic_with_speculation_keeps_invariants(tiny, other_draft, actions, spec, num_blocks, block_size,
                                                          budget, caching, prefix_cache, preemption, allocation, k):
    config = {**{"ngram": NGRAM, "self-own": OWN_POOL, "other-shared": SHARED}.get(spec, DRAFT),
              "num_speculative_tokens": k}
    draft = {"ngram": None, "self": tiny, "self-own": tiny}.get(spec, other_draft)
    eng = engine(tiny, config, draft, num_kv_blocks=num_blocks,
                 block_size=block_size, max_num_batched_tokens=budget, long_prefill_token_threshold=max(2, budget // 2),
                 enable_prefix_caching=caching, max_num_seqs=6, prefix_cache=prefix_cache, preemption_mode=preemption,
                 kv_allocation=allocation, swap_space=8 * 128 * block_size / 2**30)
    ids: list[str] = []
    for i, act in enumerate(actions):
        if act[0] == "add":
            _, n, max_tokens, shared, sampled = act
            prompt = ([5, 6, 7, 8, 9] * 2 if shared else []) + [100 + (i * 7 + j) % 9 for j in range(n)]
            params = SamplingParams(temperature=0.8 if sampled else 0, max_tokens=max_tokens, ignore_eos=True, seed=i)
            try:
                eng.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
            except OutOfKVMemoryError:  # reserve: the reservations would exceed the pool
                continue
            except ValueError:
                assert len(prompt) >= eng.max_request_tokens
                continue
            ids.append(f"r{i}")
        elif act[0] == "step":
            for _ in range(act[1]):
                eng.step()
                eng.check_integrity()
        elif ids:
            eng.abort_request(ids[act[1] % len(ids)])
        eng.check_integrity()
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        eng.step()
        eng.check_integrity()
    assert not eng.has_unfinished_requests()
    stats = eng.snapshot()["spec_decode"]
    event(f"drafts accepted: {stats['num_accepted_tokens'] > 0}")
    event(f"preempted: {eng.scheduler.num_preemptions > 0}")
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    draft_kv = stats.get("draft_kv")
    assert draft_kv is None or draft_kv["free"] == draft_kv["num_blocks"]


def test_metrics_and_snapshot_show_acceptance(tiny):
    eng = engine(tiny, DRAFT, tiny)
    run(eng, PROMPTS[:3], GREEDY)
    snap = eng.snapshot()
    s = snap["spec_decode"]
    assert s["num_draft_tokens"] >= s["num_accepted_tokens"] == sum(s["accepted_per_pos"]) > 0
    assert 0 < s["acceptance_rate"] <= 1 and 1 < s["mean_accepted_length"] <= 4
    text = EngineMetrics().render(snap, "tiny")
    assert f'inferlab:spec_decode_num_drafts_total{{model_name="tiny"}} {s["num_drafts"]}' in text
    assert f'inferlab:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {s["num_accepted_tokens"]}' in text
    assert f'inferlab:spec_decode_num_accepted_tokens_per_pos_total{{position="0",model_name="tiny"}} ' \
           f'{s["accepted_per_pos"][0]}' in text
    assert "spec_decode" not in EngineMetrics().render(engine(tiny).snapshot(), "tiny")


def test_large_batches_do_not_speculate(tiny):
    eng = engine(tiny, {**NGRAM, "disable_by_batch_size": 4})
    run(eng, PROMPTS[:5] * 2, GREEDY)  # 10 decodes at once, until a few finish
    few = engine(tiny, {**NGRAM, "disable_by_batch_size": 4})
    run(few, PROMPTS[:2], GREEDY)
    assert eng.snapshot()["spec_decode"]["num_drafts"] == 0 < few.snapshot()["spec_decode"]["num_drafts"]


def test_a_small_token_budget_still_verifies_whole_drafts(tiny):
    """The long-prefill threshold (budget // 4 by default) cut a decode's drafts too: at a budget of
    16, 3 of 4 drafts were verified, at 7 none."""
    for budget in (16, 7):
        eng = engine(tiny, NGRAM, max_num_batched_tokens=budget)
        assert eng.config.long_prefill_token_threshold < 1 + NGRAM["num_speculative_tokens"]
        run(eng, PROMPTS[:1], GREEDY)
        s = eng.snapshot()["spec_decode"]
        assert s["num_drafts"] > 0 and s["num_draft_tokens"] > 3 * s["num_drafts"], budget


def test_a_draft_model_proposes_under_the_requests_logit_bias(tiny):
    """Verification applies logit_bias; a draft model that ignored it proposed tokens the target
    then rejected. A draft that is the target itself must be accepted whole, bias or not."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = run(engine(tiny), PROMPTS[:2], params)
    banned = {t: -100.0 for t in {out[3] for out in plain}}  # tokens the plain run chose
    biased = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logit_bias=banned)
    eng = engine(tiny, DRAFT, tiny)
    assert run(eng, PROMPTS[:2], biased) == run(engine(tiny), PROMPTS[:2], biased)
    s = eng.snapshot()["spec_decode"]
    assert s["num_drafts"] > 0 and s["num_accepted_tokens"] == s["num_draft_tokens"]


def test_experiment_smoke_run(tmp_path):
    from test_experiments import run_smoke, table_rows
    rows = table_rows(run_smoke("spec_decode", tmp_path))
    assert {r[1] for r in rows} == {"off", "ngram", "draft Q4_1"}
    assert all(r[-1] in ("yes", "-") for r in rows)  # greedy output unchanged in every configuration


def test_server_streams_several_tokens_a_step(tiny):
    """Through the OpenAI server: a streamed completion with speculation equals the offline greedy text,
    chunks carry several tokens (with their logprobs), and /metrics counts drafts."""
    import httpx
    from test_server import running_server, sse_data
    prompt = PROMPTS[0]
    want = run(engine(tiny), [prompt], GREEDY)[0]
    with running_server(tiny, speculative_config=NGRAM) as server:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True, "logprobs": 1}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            chunks = [c for c in sse_data(r.iter_lines()) if c != "[DONE]"]
        tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == tiny[1].decode(want)
        assert len(tokens) == len(want) and max(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) > 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'inferlab:spec_decode_num_accepted_tokens_total{model_name="SmolLM2-135M-Instruct"} ' in metrics
        assert 'inferlab:spec_decode_num_accepted_tokens_total{model_name="SmolLM2-135M-Instruct"} 0\n' not in metrics
        server.check_engine()


def test_server_choices_with_a_draft_writing_into_the_target_blocks(tiny, other_draft):
    """n greedy choices of one prompt share its cached blocks: each equals the offline greedy text
    while a noisy draft writes its K/V into the target's blocks, and the pool is whole afterwards."""
    import httpx
    from test_server import running_server
    prompt = PROMPTS[1]
    want = tiny[1].decode(run(engine(tiny), [prompt], GREEDY)[0])
    with running_server(tiny, speculative_config=SHARED, draft=other_draft, block_size=4) as server:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "n": 3}
        choices = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"]
        assert [c["text"] for c in choices] == [want] * 3
        spec = server.engine.engine.snapshot()["spec_decode"]
        assert 0 < spec["num_accepted_tokens"] < spec["num_draft_tokens"] and "draft_kv" not in spec
        server.check_engine()
