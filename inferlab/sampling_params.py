"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from inferlab.structured.params import StructuredOutputsParams
from inferlab.text import is_text

# Caps on what a request may ask every step to check: 50,000 stop strings slowed every other
# request's steps by half. Generous for real use (OpenAI takes 4 stop strings and 300 biases).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOKEN_LIST = 1024  # stop_token_ids, logit_bias entries


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Per-request decoding settings; validated on construction with one-line `ValueError`s.

    temperature 0 (or below 1e-5) means greedy. `seed` gives the request its own random stream, so the same
    seed yields the same text whatever else shares the batch, and with n-gram speculation on or off
    (with a draft model's drafts, only in the same batch: whether a request gets drafts depends on it).
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # llama.cpp's and Ollama's repeat_last_n: the three penalties read the last N tokens of prompt and
    # output only (0: no penalty). -1: vLLM's, repetition over all of them, presence and frequency over the output
    penalty_last_n: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token
    prompt_logprobs: int | None = None  # each prompt token's logprob after the ones before it, and the top-N there
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI's)
    include_stop_str_in_output: bool = False
    n: int = 1  # completions per prompt: LLM.generate and the server submit the prompt n times
    # the text must match a JSON schema, regex, choice or grammar (inferlab/structured/)
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be drawn (None: any)
    # vLLM's: words never written: a word's last token is banned where its tokens before it were just written
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True  # False: special tokens stay in the text (token_ids hold them either way)
    # vLLM's: only the prompt's last k tokens run (-1: as many as the context leaves room for)
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks of construction, again when a request is added: a field set afterwards
        (`sp.max_tokens = 0`) is refused as it would have been at first."""
        # types first (the range checks' comparisons would raise TypeError), numpy's scalars taken as Python's
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
            setattr(self, name, float(getattr(self, name)))
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "n", "penalty_last_n",
                     "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, None if value is None else int(value))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):  # "no" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.min_tokens is None or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k is None or self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.penalty_last_n is None or self.penalty_last_n < -1:
            raise ValueError(f"penalty_last_n must be -1 (all tokens) or an integer >= 0, got {self.penalty_last_n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {getattr(self, name)}")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or self.truncate_prompt_tokens >= 1):
            raise ValueError(f"truncate_prompt_tokens must be -1 (as many as fit) or >= 1, got "
                             f"{self.truncate_prompt_tokens}")
        self._check_token_lists()
        if self.n is None or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        stops = self.stop_list
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if any(not s.isascii() and not is_text(s) for s in stops):  # a lone surrogate, no text ever holds
            raise ValueError("stop strings must be valid Unicode text (a lone surrogate such as \\ud800 never matches)")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                     for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if len(self.stop_token_ids or []) > MAX_TOKEN_LIST:
            raise ValueError(f"stop_token_ids takes at most {MAX_TOKEN_LIST} token ids")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                                 f"{type(self.structured_outputs).__name__}")
            self.structured_outputs.validate()
            if self.min_tokens:  # the grammar ends the answer where it is complete, and may allow nothing else
                raise ValueError("min_tokens cannot be used with structured_outputs: the grammar says where the "
                                 "answer ends")
        bias = self.logit_bias or {}
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id to bias, got {type(bias).__name__}")
        if len(bias) > MAX_TOKEN_LIST:
            raise ValueError(f"logit_bias takes at most {MAX_TOKEN_LIST} token ids")
        bad = [t for t in bias if not isinstance(t, int) or isinstance(t, bool) or t < 0]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {bad[0]!r}")
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not -100.0 <= b <= 100.0
               for b in bias.values()):
            raise ValueError("logit_bias values must be numbers in [-100, 100]")

    def _check_token_lists(self) -> None:
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, (list, tuple)) or not allowed or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in allowed)):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {allowed!r}")
        words = self.bad_words or []
        if not isinstance(words, (list, tuple)) or any(not isinstance(w, str) or not w.strip() for w in words):
            raise ValueError(f"bad_words must be a list of words (non-empty strings), got {self.bad_words!r}")
        if len(words) > MAX_STOP_STRINGS * 16 or any(len(w) > MAX_STOP_CHARS or not is_text(w) for w in words):
            raise ValueError(f"bad_words takes at most {MAX_STOP_STRINGS * 16} words of at most {MAX_STOP_CHARS} "
                             "characters of valid text")

    def fork(self, j: int) -> SamplingParams:
        """Completion j of n as a request of its own (the engine runs one sequence a request): n = 1,
        and with a seed, seed + j, so the n are distinct yet reproducible (LLM.generate's and the server's)."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + j)

    @property
    def stop_list(self) -> list[str]:
        """`stop` as a list, read when the request is added (so a `stop` set after construction counts)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32; the limit is greedy.
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.penalty_last_n != 0 and (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                                             or self.frequency_penalty != 0.0)


# vLLM's SamplingParams fields that ported scripts pass: taken at the one value InferLab runs, else
# refused with what to do instead (not Python's "unexpected keyword argument")
VLLM_ONLY = {
    "best_of": ((None, 1), "ask for n completions and choose among them"),
    "spaces_between_special_tokens": ((True,), "special tokens kept in the text (skip_special_tokens=False) are "
                                                "written as the tokenizer decodes them"),
    "detokenize": ((True,), "the text is always made, and token_ids are there too"),
    "output_kind": ((None,), "LLM.generate returns final outputs; LLMEngine.step() gives new_text and "
                             "new_token_ids beside the whole text"),
}
_dataclass_init = SamplingParams.__init__


def _init(self: SamplingParams, *args, **kwargs) -> None:
    for name in [k for k in kwargs if k in VLLM_ONLY]:
        value = kwargs.pop(name)
        taken, hint = VLLM_ONLY[name]
        if not any(value is t or (type(value) is type(t) and value == t) for t in taken):
            raise ValueError(f"SamplingParams {name}={value!r} (vLLM's) is not taken here: {hint}")
    unknown = sorted(set(kwargs) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise ValueError(f"SamplingParams takes no argument {unknown[0]!r}")
    _dataclass_init(self, *args, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
SamplingParams.__init__ = _init
