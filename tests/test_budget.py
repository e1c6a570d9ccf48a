"""max_num_batched_tokens="auto": the step budget follows the measured step time toward a target,
in the engine and (with the cost model's step times) in the simulator."""
from __future__ import annotations

import pytest

from inferlab import SamplingParams
from inferlab.budget import LEAST, START, StepBudget
from inferlab.config import EngineConfig
from inferlab.sim.cost_model import DEFAULT
from inferlab.sim.replica import Replica
from inferlab.sim.simulator import TraceRequest, run


def drive(budget: StepBudget, seconds, steps: int = 30, running: int = 4) -> None:
    """Steps that fill their budget, every fourth one a small step (decodes only)."""
    for i in range(steps):
        given = budget.for_step(num_running=running)
        n = running if i % 4 == 0 else given
        budget.observe(n, seconds(n))


def test_budget_converges_on_the_target_step_time():
    budget = StepBudget(target=0.25)
    drive(budget, lambda n: 0.05 + 0.002 * n)  # 50 ms a step plus 2 ms a token
    assert budget.tokens == pytest.approx(100, rel=0.05)  # (0.25 - 0.05) / 0.002
    alone = StepBudget(target=0.25)  # steps that all fill their budget: proportional at first, then the line
    for _ in range(20):
        given = alone.for_step(num_running=4)
        alone.observe(given, 0.05 + 0.002 * given)
    assert 80 <= alone.tokens <= 120


def test_budget_keeps_prefill_going_when_the_fixed_part_alone_exceeds_the_target():
    budget = StepBudget(target=0.25)
    drive(budget, lambda n: 0.4 + 0.002 * n)  # a loaded machine: decodes alone take 0.4 s
    assert budget.tokens == pytest.approx(4 + 0.125 / 0.002, rel=0.05)  # its tokens take half the target


def test_budget_moves_at_most_twofold_and_learns_only_from_full_steps():
    budget = StepBudget(target=0.25)
    budget.for_step(num_running=0)
    budget.observe(START, 100.0)  # one very slow step: halved, not divided by 400
    assert budget.tokens == START // 2
    budget.for_step(num_running=0)
    budget.observe(10, 0.001)  # a step far from its budget says nothing about a larger one
    assert budget.tokens == START // 2
    assert budget.for_step(num_running=500) == 500 + LEAST  # running decodes never wait for the budget


def test_config_takes_auto_and_refuses_other_words():
    assert EngineConfig(max_num_batched_tokens="auto").long_prefill_token_threshold is None  # the budget itself
    with pytest.raises(ValueError, match="max_num_batched_tokens must be 'auto' or an integer >= 1"):
        EngineConfig(max_num_batched_tokens="fast")
    with pytest.raises(ValueError, match="step_time_target must be > 0"):
        EngineConfig(max_num_batched_tokens="auto", step_time_target=0)


def test_auto_budget_bounds_step_time_during_a_prefill_burst(monkeypatch):
    """In the simulator (the built-in cost model: 45 ms a step plus 1.1 ms a prefill token), 4 chats
    decode while 32 prompts of 1,024 tokens arrive at once: a fixed budget of 2,048 makes steps of
    seconds, during which every chat waits for its next token; the auto budget keeps them near 0.25 s."""
    durations: list[float] = []
    real_step = Replica.step

    def timed(self: Replica) -> None:
        start = self.clock.now
        real_step(self)
        durations.append(self.clock.now - start)

    monkeypatch.setattr(Replica, "step", timed)
    trace = [TraceRequest(0.0, 32, 200) for _ in range(4)] + [TraceRequest(1.0, 1024, 8) for _ in range(32)]
    worst = {}
    for budget in (2048, "auto"):
        durations.clear()
        fleet = run(EngineConfig(max_num_batched_tokens=budget, step_time_target=0.25), 4096, trace, DEFAULT)
        assert len(fleet.records) == len(trace)
        worst[budget] = max(durations)
    assert worst[2048] > 2.0 and worst["auto"] < 0.4, worst
    assert 120 < fleet.replicas[0].budget.tokens < 220  # about (0.25 - 0.045 - 4 decodes) / 1.1 ms


def test_auto_budget_gives_the_same_greedy_output(make_tiny_engine):
    prompts = [list(range(100 + i, 160 + 7 * i)) for i in range(6)]

    def outputs(**config) -> tuple[list[list[int]], list[int]]:
        engine = make_tiny_engine(num_kv_blocks=256, **config)
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=12))
        done, sizes = {}, []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
            assert engine.last_step_tokens <= engine.scheduler.max_num_batched_tokens
            sizes.append(engine.last_step_tokens)
        engine.check_integrity()
        return [done[str(i)] for i in range(len(prompts))], sizes

    fixed, _ = outputs()
    auto, sizes = outputs(max_num_batched_tokens="auto", step_time_target=0.25)
    assert auto == fixed
    assert max(sizes) <= START  # the first steps' budget: these prompts fit it at once


def test_budget_stuck_at_its_least_grows_to_learn_what_a_token_costs():
    budget = StepBudget(target=0.25, start=LEAST)
    for _ in range(30):  # every step fills its budget; decodes of 6 requests alone take 1 s
        given = budget.for_step(num_running=6)
        budget.observe(given, 1.0 + 0.002 * given)
    assert budget.tokens == pytest.approx(6 + LEAST + 0.125 / 0.002, rel=0.15)
