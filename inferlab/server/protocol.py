"""OpenAI request bodies (pydantic) and their translation to SamplingParams.

Types are strict (a string where a number belongs is an error, not coerced). Unknown fields are
ignored, as OpenAI clients send some this server has no use for, except those that would change
the output (`unsupported.py`): ignoring them would answer another question than the one asked, so
they are refused with a 400 unless they hold their do-nothing value. Range checks live in
SamplingParams, so the server and the Python API refuse the same values with the same words.
"""
from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from inferlab.outputs import RequestOutput
from inferlab.sampling_params import SamplingParams
from inferlab.server.constraints import ConstraintFields
from inferlab.server.messages import MAX_MESSAGES, ChatMessage, template_messages
from inferlab.server.tools import Tool, ToolPlan
from inferlab.server.unsupported import UNSUPPORTED, harmless
from inferlab.structured.params import StructuredOutputsParams

Float = Annotated[float, Strict()]
# JSON integers are unbounded; past int64 torch overflows deep inside a step (top_k, seed)
Int = Annotated[int, Strict(), Field(ge=-2**63, le=2**63 - 1)]
TokenIds = list[Int]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: every chunk carries its choice's usage so far


class SamplingFields(ConstraintFields):
    model_config = ConfigDict(extra="allow")  # kept, to refuse the UNSUPPORTED ones; the rest are ignored
    NEUTRAL_HERE: ClassVar[dict] = {}  # this endpoint's own do-nothing values (vLLM's defaults differ by endpoint)

    model: StrictStr | None = None
    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    n: Int = 1
    seed: Int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[Int] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: Int = 0
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    priority: Int = 0
    user: StrictStr | None = None
    cache_salt: StrictStr | None = None  # vLLM's: only requests with the same salt share cached blocks
    logit_bias: dict[StrictStr, Float] | None = None  # token id (as a string, OpenAI's) -> bias
    # vLLM's (SamplingParams has their meanings)
    allowed_token_ids: list[Int] | None = None
    bad_words: list[StrictStr] | None = None
    skip_special_tokens: StrictBool = True
    truncate_prompt_tokens: Int | None = None
    return_token_ids: StrictBool = False  # each choice's token ids and its prompt's beside the text

    def token_ids(self, out: RequestOutput, new: bool = False) -> dict:
        """vLLM's return_token_ids: a choice's token ids (`new`: this chunk's) and its prompt's (which
        chat answers at the response's top level)."""
        if not self.return_token_ids:
            return {}
        return {"prompt_token_ids": out.prompt_token_ids,
                "token_ids": out.outputs[0].new_token_ids if new else out.outputs[0].token_ids}

    @model_validator(mode="before")
    @classmethod
    def null_means_default(cls, data: Any) -> Any:
        """OpenAI's spec lets a client send null for `n`, `stream`, `logprobs`, `echo`...: the
        default (the openai package sends it for an argument given as None)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or type(None) in typing.get_args(cls.model_fields[k].annotation)
                or cls.model_fields[k].is_required()}

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in UNSUPPORTED and not harmless(name, value, extra, self.NEUTRAL_HERE):
                raise ValueError(UNSUPPORTED[name].format(value=value))

    def token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        if not all(k.isascii() and k.isdigit() for k in self.logit_bias):  # "١٢" and "²" are digits to Python
            raise ValueError("logit_bias keys must be token ids (non-negative integers as strings)")
        return {int(k): v for k, v in self.logit_bias.items()}

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            structured_outputs=self.structured(), max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            # `is None`, not `or`: a 0 sent is refused by SamplingParams, not turned into the default
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=self.token_bias(),
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            skip_special_tokens=self.skip_special_tokens, truncate_prompt_tokens=self.truncate_prompt_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    NEUTRAL_HERE: ClassVar[dict] = {"add_special_tokens": True}  # a text prompt's BOS, if the model has one
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: Int | None = 16  # OpenAI's default for completions
    logprobs: Int | None = None
    echo: StrictBool = False  # the prompt before the answer: its text, and with logprobs its tokens' (vLLM's)
    prompt_logprobs: Int | None = None  # vLLM's: each prompt token's logprob and top-N, in the choice
    # the chat API's name, which clients such as guidellm send on every endpoint beside max_tokens
    max_completion_tokens: Int | None = None
    suffix: StrictStr | None = None  # what follows: the answer fills the middle (a code model's, model/fim.py)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """With echo and logprobs the prompt is scored too, as vLLM does (its tokens are the answer's
        first), to prompt_logprobs' top-N where given, else logprobs'."""
        scored = self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else logprobs
        return replace(super().sampling_params(max_tokens, logprobs), prompt_logprobs=scored)

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt alone, scored with logprobs where asked, nothing generated
        (OpenAI's legacy way to score a text, which vLLM keeps)."""
        return self.echo and self.max_tokens == 0

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.prompt_only and self.min_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens (0)")
        if self.suffix and (self.echo or not all(isinstance(p, str) for p in self.prompts())):
            raise ValueError("suffix fills the middle after a text prompt: it takes neither token ids nor echo")
        if self.max_completion_tokens is not None and self.max_completion_tokens != self.max_tokens:
            raise ValueError(f"max_completion_tokens ({self.max_completion_tokens}) differs from max_tokens "
                             f"({self.max_tokens}): the completions API reads max_tokens")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_of_its_shapes(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        try:  # pydantic's own answer names one shape of the union ("prompt.str: ...") whatever was sent
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("prompt_shape", "must be a string, a list of strings, a list of token "
                                      "ids, or a list of lists of token ids") from None

    def prompts(self) -> list[str | dict]:
        """The prompt field as a list of engine prompts (one per choice group)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if isinstance(p[0], int):
            return [{"prompt_token_ids": p}]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = None
    tool_choice: Any = None  # none, auto, required or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: StrictBool | None = None  # false: one call at most
    _tools: ToolPlan | None = PrivateAttr(default=None)
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False  # vLLM's: continue the last (assistant) message
    chat_template_kwargs: dict[StrictStr, Any] | None = None  # vLLM's: more variables for the template
    prompt_logprobs: Int | None = None  # vLLM's: the templated prompt's logprobs, beside the choices

    def template_messages(self) -> list[dict]:
        return template_messages(self.messages)

    def tool_plan(self, parser: str | None) -> ToolPlan:
        """What `tools` and `tool_choice` ask (see tools.py); `parser`: the server's tool-call parser."""
        self._tools = ToolPlan.of(self.tools, self.tool_choice, parser, self.parallel_tool_calls is not False)
        return self._tools

    def structured(self) -> StructuredOutputsParams | None:
        own, held = super().structured(), self._tools and self._tools.structured()
        if own and held:
            raise ValueError(f"tool_choice {self._tools.mode} and a structured output both constrain the answer: "
                             "send one")
        return held or own

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return replace(super().sampling_params(max_tokens, logprobs), prompt_logprobs=self.prompt_logprobs)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.stream and self.prompt_logprobs is not None:  # as vLLM: a chat chunk has no place for them
            raise ValueError("prompt_logprobs is not available with stream: true on chat; send the request "
                             "without stream (or to /v1/completions, which streams them)")

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        return self.top_logprobs or 0


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion's `prompt` or a chat's `messages`, as the model would see it
    (with the chat's own options). A field it does not read is refused by name, not ignored."""
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[StrictStr, Any] | None = None
    return_token_strs: StrictBool = False

    def template_messages(self) -> list[dict]:
        return template_messages(self.messages or [])


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    tokens: list[Int]
