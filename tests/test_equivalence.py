"""Greedy outputs do not depend on how the engine schedules (caching, chunking, preemption, policy)
nor on how attention reads the cache: the reference runs the PyTorch path with nothing cached; the
others run the default backend (the native kernel on CPU) unless they say otherwise."""
from __future__ import annotations

import pytest

from inferlab import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=20)


@pytest.fixture(scope="module")
def prompts(chat_prompts):
    # the chat prompts share the template's system prompt; add two that share a longer prefix
    base = chat_prompts[-1]
    return [*chat_prompts, base[:-3] + [28, 1780, 30], base + [198, 504]]


@pytest.fixture(scope="module")
def reference(smol, prompts):
    from inferlab import LLM
    llm = LLM(loaded=smol, num_kv_blocks=512, enable_prefix_caching=False, attention_backend="torch")
    return [o.outputs[0].token_ids for o in _run(llm, prompts)]


def _run(llm, prompts, **kw):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False, **kw)
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return outs


def test_prefix_caching_on_gives_same_output_and_hits(make_llm, prompts, reference):
    # one at a time, so each prompt can reuse the shared system-prompt blocks of earlier ones
    llm = make_llm(num_kv_blocks=512, block_size=4, enable_prefix_caching=True, max_num_seqs=1)
    assert [o.outputs[0].token_ids for o in _run(llm, prompts)] == reference
    bm = llm.engine.block_manager
    assert bm.prefix_hits >= (len(prompts) - 1) * 28
    # run again: now whole prompts (but the last token) come from the cache
    again = _run(llm, prompts)
    assert [o.outputs[0].token_ids for o in again] == reference
    assert all(o.num_cached_tokens >= len(p) - 4 for o, p in zip(again, prompts, strict=True))


def test_radix_prefix_cache_gives_same_output_and_hits(make_llm, prompts, reference):
    # (that the tree finds exactly the blocks the hash chain finds is property-tested in test_radix_cache)
    llm = make_llm(num_kv_blocks=512, block_size=4, prefix_cache="radix")
    first = _run(llm, prompts[:1])  # caches the system prompt the others share, then the rest in one batch
    assert [o.outputs[0].token_ids for o in first + _run(llm, prompts[1:])] == reference
    assert llm.engine.block_manager.prefix_hits >= (len(prompts) - 1) * 24
    again = _run(llm, prompts)
    assert [o.outputs[0].token_ids for o in again] == reference
    assert all(o.num_cached_tokens >= len(p) - 4 for o, p in zip(again, prompts, strict=True))


def test_prefix_caching_off_never_hits(make_llm, prompts, reference):
    llm = make_llm(num_kv_blocks=512, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in _run(llm, prompts)] == reference
    assert llm.engine.block_manager.prefix_hits == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_pool_preempts_and_recomputes_or_swaps(make_llm, prompts, reference, mode):
    llm = make_llm(num_kv_blocks=14, block_size=16, preemption_mode=mode)
    assert [o.outputs[0].token_ids for o in _run(llm, prompts)] == reference
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.snapshot().get("swapped_in", 0) > 0 or mode == "recompute"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_small_token_budget_chunks_prefill(make_llm, prompts, reference, backend):
    llm = make_llm(num_kv_blocks=512, max_num_batched_tokens=16, long_prefill_token_threshold=7,
                   attention_backend=backend)
    seen = []
    sched = llm.engine.scheduler
    original = sched.schedule

    def spy():
        out = original()
        seen.append(out)
        return out

    sched.schedule = spy
    assert [o.outputs[0].token_ids for o in _run(llm, prompts)] == reference
    assert all(o.num_tokens <= 16 for o in seen)
    assert all(n <= 7 for o in seen for _, n in o.scheduled)
    mixed = [o for o in seen if len({n > 1 for _, n in o.scheduled}) == 2]
    assert mixed, "some step should mix a prefill chunk with decodes"


@pytest.mark.parametrize("policy", ["fcfs", "priority", "sjf"])
def test_each_policy_same_output_under_pressure(make_llm, prompts, reference, policy):
    llm = make_llm(num_kv_blocks=20, scheduling_policy=policy, max_num_seqs=4)
    prio = list(range(len(prompts)))[::-1]
    outs = _run(llm, prompts, priority=prio if policy == "priority" else None)
    assert [o.outputs[0].token_ids for o in outs] == reference

