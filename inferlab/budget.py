"""The token budget of each step when `max_num_batched_tokens="auto"`: as many tokens as keep a step
near `step_time_target` seconds, learnt from the steps measured so far (Sarathi-Serve sizes prefill
chunks for a latency target the same way). A fixed budget trades decode latency for prefill
throughput blindly: 2,048 tokens is a step of seconds on a small CPU, and every running stream waits
that long for its next token while a burst of prompts is prefilled.

A step's time is about a fixed part (the running requests' decodes, the weights read once) plus so
much a token. The fixed part is learnt from small steps (decodes and at most a minimal chunk), the
cost of a token from the line between them and each step that used its whole budget; the budget is
then what fills the target. Where the fixed part alone exceeds the target (a loaded machine, a big
batch), shrinking the budget could not reach it and would only starve prefill, so the budget's
tokens may still take half the target (and a budget stuck at its least grows to learn their cost).
The budget at most halves or doubles at once, so one noisy step cannot swing it far. The engine and
the simulator (with its cost model's step times) use this same class.
"""
from __future__ import annotations

START = 256  # the first steps' budget, before any step was measured
LEAST = 32  # tokens of prefill a step can always take beside its decodes: new requests keep getting in
MOST = 16384


class StepBudget:
    def __init__(self, target: float, start: int = START) -> None:
        self.target = target
        self.tokens = start  # the budget learnt so far
        self.given = start  # the budget of the step being run
        self.running = 0  # requests running when it was given
        self.small: tuple[float, float] | None = None  # (tokens, seconds) of small steps, averaged

    def for_step(self, num_running: int) -> int:
        """The next step's budget: the one learnt, but never so small that running requests' decodes
        would wait, with LEAST tokens on top so that waiting requests are still admitted."""
        self.running = num_running
        self.given = max(self.tokens, num_running + LEAST)
        return self.given

    def observe(self, num_tokens: int, seconds: float) -> None:
        """The step just given its budget ran `num_tokens` in `seconds`."""
        if seconds <= 0:
            return
        if num_tokens <= self.running + LEAST:
            n, s = self.small or (num_tokens, seconds)
            self.small = (0.8 * n + 0.2 * num_tokens, 0.8 * s + 0.2 * seconds)
        if num_tokens < 0.9 * self.given:  # it did not fill its budget: nothing learnt about a larger one
            return
        want = num_tokens * self.target / seconds  # with nothing else known: steps proportional to tokens
        if self.small is not None and num_tokens - self.small[0] >= LEAST:
            n0, s0 = self.small
            per_token = max(seconds - s0, 1e-9) / (num_tokens - n0)
            want = n0 + max(self.target - s0, self.target / 2) / per_token
        elif self.small is not None and self.small[1] >= self.target:
            want = 2 * self.tokens  # small steps miss the target anyway: a larger one tells a token's cost
        self.tokens = round(min(MOST, self.tokens * 2, max(LEAST, self.tokens / 2, want)))
