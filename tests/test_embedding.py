"""InferLab inside someone's application: `LLM` called from threads or interrupted, the step API's
ids and observers, and `AsyncEngine` streams that are duplicated, dropped or never read."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest

from inferlab import LLM, SamplingParams
from inferlab.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [100 + i, 200 + i, 300 + i]} for i in range(6)]


@pytest.fixture
def llm(tiny) -> LLM:
    return LLM(loaded=tiny, num_kv_blocks=64, block_size=4)


def tokens(outs) -> list[tuple[int, ...]]:
    return [tuple(o.outputs[0].token_ids) for o in outs]


def test_generate_from_several_threads_takes_turns(llm):
    """Each call stepped the others' requests too: KeyErrors, and a failed request."""
    want = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    got, errors = {}, []

    def call(i: int) -> None:
        try:
            got[i] = [tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(runs == [want] * 3 for runs in got.values()) and len(got) == 4
    llm.engine.check_integrity()


def interrupt_on(n: int, then=lambda *args, **kwargs: None):
    """A stand-in that raises KeyboardInterrupt on its n-th call (a Ctrl-C landing there), else calls `then`."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return then(*args, **kwargs)
    return call


def test_an_interrupted_generate_leaves_nothing_behind(llm):
    """Ctrl-C mid-generate left its requests in the engine: the next call failed with a KeyError
    (use_tqdm), or quietly ran them to the end first."""
    want = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    interrupt = interrupt_on(3)
    llm.engine.step_observers.append(interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    llm.engine.step_observers.remove(interrupt)
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert tokens(llm.generate(PROMPTS, GREEDY)) == want
    llm.engine.check_integrity()


def test_an_interrupt_while_prompts_are_added_leaves_nothing_behind(llm, monkeypatch):
    """Ctrl-C landing in add_request (thousands of prompts take a while to add) left the prompts added
    so far running inside the next calls; and an interrupted call's progress bar stayed open."""
    import tqdm as tqdm_module
    real, added = llm.engine.add_request, []
    monkeypatch.setattr(llm.engine, "add_request", interrupt_on(5, lambda *a, **k: added.append(real(*a, **k))))
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    assert len(added) == 4 and not llm.engine.requests and llm.engine.block_manager.num_free_blocks == 64
    monkeypatch.undo()
    processor = llm.engine.output_processor  # inside add_request, after the scheduler took the request
    monkeypatch.setattr(processor, "add", interrupt_on(3, processor.add))
    with pytest.raises(KeyboardInterrupt):  # not a KeyError from aborting a request half added
        llm.generate(PROMPTS, GREEDY)
    monkeypatch.undo()
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 64
    interrupt = interrupt_on(2)
    llm.engine.step_observers.append(interrupt)
    bars = len(tqdm_module.tqdm._instances)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY)
    llm.engine.step_observers.remove(interrupt)
    assert len(tqdm_module.tqdm._instances) == bars  # closed
    llm.engine.check_integrity()


def test_prompts_may_come_from_any_iterator_and_chat_of_nothing_is_nothing(llm):
    want = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert tokens(llm.generate((p for p in PROMPTS), GREEDY, use_tqdm=False)) == want
    assert tokens(llm.generate(map(dict, PROMPTS), GREEDY, use_tqdm=False)) == want
    assert llm.chat([], GREEDY, use_tqdm=False) == [] == llm.generate([], GREEDY, use_tqdm=False)


def test_a_failing_step_observer_loses_no_output(make_tiny_engine, caplog):
    """A dashboard's bug raised out of step(), and the request finishing in it was gone for good."""
    engine = make_tiny_engine()
    engine.step_observers.append(lambda outputs: 1 / 0)
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=1))
    with caplog.at_level(logging.ERROR, logger="inferlab"):
        outs = engine.step()
    assert [o.request_id for o in outs if o.finished] == ["a"] and "a step observer" in caplog.text


@pytest.mark.parametrize("rid", [5, None, ("x", 1), ["x"]])
def test_a_request_id_must_be_a_string(make_tiny_engine, rid):
    """(A number or a tuple was taken, then could not be aborted.)"""
    engine = make_tiny_engine()
    with pytest.raises(ValueError, match="request_id must be a string"):
        engine.add_request(rid, PROMPTS[0])
    assert not engine.requests


def test_async_streams_duplicated_dropped_or_never_read(tiny):
    """A duplicate id was refused after it had taken the first request's stream (whose reader then
    waited forever); a stream never read, or left mid-way, kept its request generating for nobody."""
    from inferlab.config import EngineConfig
    from inferlab.engine import LLMEngine
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), loaded=tiny))
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def live() -> list[str]:
        return await engine.run(lambda: list(engine.engine.requests))

    async def main() -> None:
        first = await engine.add("same", PROMPTS[0], GREEDY)
        with pytest.raises(ValueError, match="already in use"):
            await engine.add("same", PROMPTS[1], GREEDY)
        got = [out async for out in first]
        assert got[-1].finished and len(got[-1].outputs[0].token_ids) == 8
        unread = await engine.add("unread", PROMPTS[2], long)
        left = await engine.add("left", PROMPTS[3], long)
        async for _ in left:
            break
        assert set(await live()) == {"unread", "left"}
        del unread, left
        gc.collect()
        for _ in range(50):
            if not await live():
                break
            await asyncio.sleep(0.05)
        assert not await live()
    try:
        asyncio.run(main())
        assert asyncio.run(engine.run(lambda: engine.engine.block_manager.num_free_blocks)) == 64
    finally:
        engine.shutdown()


def test_an_async_engine_dropped_without_shutdown_is_freed_with_its_thread(tiny):
    """(A notebook cell run again kept a whole model and a thread for each engine it had made.)"""
    import time
    import weakref

    from inferlab.config import EngineConfig
    from inferlab.engine import LLMEngine
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), loaded=tiny))
    outs = asyncio.run(_collect(engine, "r", PROMPTS[0]))
    assert outs[-1].finished
    model, thread = weakref.ref(engine.engine), engine._thread
    del engine
    for _ in range(100):
        gc.collect()
        if model() is None and not thread.is_alive():
            break
        time.sleep(0.05)
    assert model() is None and not thread.is_alive()


def test_a_request_whose_add_is_cancelled_does_not_run_for_nobody(tiny):
    from inferlab.config import EngineConfig
    from inferlab.engine import LLMEngine
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), loaded=tiny))
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    gate, adding = threading.Event(), threading.Event()
    real = engine.engine.add_request

    def add_request(*args, **kwargs):  # on the engine thread: added, then held until the caller has gone
        real(*args, **kwargs)
        adding.set()
        gate.wait(10)
    engine.engine.add_request = add_request

    async def main() -> list[str]:
        task = asyncio.ensure_future(engine.add("r", PROMPTS[0], long))
        while not adding.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.run(lambda: list(engine.engine.requests))  # after what the cancel queued
    try:
        assert asyncio.run(main()) == []
    finally:
        engine.shutdown()


async def _collect(engine: AsyncEngine, rid: str, prompt) -> list:
    return [out async for out in await engine.add(rid, prompt, GREEDY)]


def test_use_tqdm_takes_a_bar_of_ones_own(llm):
    """vLLM's use_tqdm may be a tqdm-like function; it was drawn as the default bar instead."""
    class Bar:
        def __init__(self, total: int, **kwargs) -> None:
            self.total, self.n, self.closed = total, 0, False

        def update(self, n: int) -> None:
            self.n += n

        def set_postfix_str(self, text: str, refresh: bool = True) -> None:
            pass

        def close(self) -> None:
            self.closed = True
    made = []
    llm.generate(PROMPTS, GREEDY, use_tqdm=lambda **kwargs: made.append(Bar(**kwargs)) or made[-1])
    assert [(b.total, b.n, b.closed) for b in made] == [(len(PROMPTS), len(PROMPTS), True)]
