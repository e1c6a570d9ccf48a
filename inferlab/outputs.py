"""What generation returns, in vLLM's shape: RequestOutput holding CompletionOutputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Logprob(float):
    """A token's log-probability: a float, as InferLab's `{token_id: logprob}` entries hold it, that
    also answers vLLM's `Logprob` fields, so code written for either reads it: `.logprob`, `.rank` (1:
    the most likely token of the step; None where unknown) and `.decoded_token` (its text, decoded
    when read)."""
    __slots__ = ("rank", "_token_id", "_tokenizer")

    def __new__(cls, value: float, rank: int | None = None, token_id: int | None = None, tokenizer: Any = None):
        lp = super().__new__(cls, value)
        lp.rank, lp._token_id, lp._tokenizer = rank, token_id, tokenizer
        return lp

    @property
    def logprob(self) -> float:
        return float(self)

    @property
    def decoded_token(self) -> str | None:
        if self._tokenizer is None or self._token_id is None:
            return None
        return self._tokenizer.token_text(self._token_id)

    def __reduce__(self):  # a plain float's worth: the tokenizer stays in this process
        return Logprob, (float(self), self.rank, self._token_id)


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far (stop string removed)
    token_ids: list[int]  # all generated token ids so far
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # per token: top-N plus the sampled token
    cumulative_logprob: float | None = None
    new_token_ids: list[int] = field(default_factory=list)  # generated this step
    new_text: str = ""  # text released this step (streaming delta)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request (finish_reason "error")
    # SamplingParams.prompt_logprobs: per prompt token, its logprob after the ones before it and the top-N
    # there (None for the first, which nothing predicts), as vLLM's; None when not asked
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # a pooling request's vector (pooling.py: an embedding, or classes), set on its one output;
    # None for a generation
    embedding: list[float] | None = None


class RequestFailed(RuntimeError):
    """What the command-line tools raise when the engine failed a request (the engine keeps running
    and logs why; a tool whose answer or figure is then wrong exits with status 1)."""


def check_outputs(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """`outputs`, or RequestFailed naming how many failed and the first one's error."""
    failed = [o for o in outputs if o.error is not None]
    if failed:
        raise RequestFailed(f"{len(failed)} of {len(outputs)} requests failed (the first, {failed[0].request_id}: "
                            f"{failed[0].error})")
    return outputs
