"""Ollama's request bodies (/api/generate, /api/chat, /api/embed) as this server reads them: Ollama's sampling
defaults, the options it leaves to Ollama's runtime, and the fields that would change the answer
and are not implemented, each refused by name. `null` stands for a field's default, as Ollama's Go
server reads it, and a whole-number float is taken where an integer is due."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, model_validator

from inferlab.sampling_params import SamplingParams
from inferlab.server.embeddings import MAX_INPUTS
from inferlab.server.messages import MAX_MESSAGES
from inferlab.server.protocol import Float, Int
from inferlab.structured.params import StructuredOutputsParams

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "repeat_last_n": 64}
# read and left alone: Ollama's runtime settings, mirostat's tuning (it stays off), and the fields its
# clients' typed options still carry that Ollama itself no longer reads (rope_*, num_gqa, embedding_only);
# num_keep is read where a prompt is cut to fit (`num_keep()`)
RUNTIME = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
           "low_vram", "num_keep", "penalize_newline", "vocab_only", "f16_kv", "logits_all", "embedding_only",
           "mirostat_eta", "mirostat_tau", "num_gqa", "rope_frequency_base", "rope_frequency_scale"}
NEUTRAL = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}  # anything else is refused


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


Whole = Annotated[Int, BeforeValidator(_whole)]  # 42.0 is 42, as Ollama's server converts it


class Unset(BaseModel):
    """A body part whose `null` fields are left out: their defaults."""

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Options(Unset):
    model_config = ConfigDict(extra="allow")

    temperature: Float | None = None
    top_k: Whole | None = None
    top_p: Float | None = None
    min_p: Float | None = None
    seed: Whole | None = None
    num_predict: Whole | None = None  # -1: until a stop or the context's end (-2, which fills it, as well)
    stop: StrictStr | list[StrictStr] | None = None
    repeat_penalty: Float | None = None
    repeat_last_n: Whole | None = None  # the penalties' window: -1 the whole context, 0 none
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None


class Message(Unset):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    images: list[Any] | None = None
    tool_calls: list[dict[StrictStr, Any]] | None = None


class OllamaRequest(Unset):
    model_config = ConfigDict(extra="ignore")  # keep_alive and whatever else tunes the runtime only

    model: StrictStr
    stream: StrictBool = True
    options: Options = Options()
    keep_alive: Any = None
    format: Any = None
    think: StrictBool | None = None  # a thinking model's reasoning on or off (the server's reasoning parser)
    logprobs: StrictBool = False
    # /api/generate's
    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False
    suffix: StrictStr | None = None
    template: StrictStr | None = None
    images: list[Any] | None = None
    context: list[Any] | None = None
    # /api/chat's
    messages: list[Message] = Field(default=[], max_length=MAX_MESSAGES)
    tools: list[Any] | None = None
    # /api/embed's (/api/embeddings takes `prompt`)
    input: StrictStr | list[StrictStr] = Field(default=[], max_length=MAX_INPUTS)
    truncate: StrictBool = True  # an input past the context keeps its first tokens (false: refused)
    dimensions: Whole | None = None

    def refuse_unsupported(self) -> None:
        self.structured()  # a format that cannot be: refused here, in Ollama's error shape
        asked = {"template": self.template, "images": self.images,
                 "context": self.context, "logprobs": self.logprobs}
        for name, value in asked.items():
            if value not in (None, "", [], False):
                raise ValueError(f"{name} is not supported by this server")
        if any(m.images for m in self.messages):
            raise ValueError("images are not supported (this model reads text only)")
        if self.options.repeat_last_n is not None and self.options.repeat_last_n < -1:
            raise ValueError(f"options.repeat_last_n must be -1 (the whole context), 0 (no penalty) or more, got "
                             f"{self.options.repeat_last_n}")
        for name, value in (self.options.model_extra or {}).items():
            if value is None:  # unset, as Ollama reads it
                continue
            if name in NEUTRAL and value != NEUTRAL[name]:
                raise ValueError(f"options.{name} {value!r} is not supported here")
            if name not in NEUTRAL and name not in RUNTIME:
                raise ValueError(f"options.{name} is not an option this server knows")

    def structured(self) -> StructuredOutputsParams | None:
        """Ollama's `format`: "json" (any JSON object) or a JSON schema."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return StructuredOutputsParams(json_object=True)
        if not isinstance(self.format, dict):
            raise ValueError(f'format must be "json" or a JSON schema (an object), got {self.format!r}')
        try:
            return StructuredOutputsParams(json=self.format)
        except ValueError as e:
            raise ValueError(f"format: {e}") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        o = self.options
        given = {k: v for k, v in o.model_dump(exclude_unset=True).items() if v is not None}
        value = {**DEFAULTS, **given}.get
        stop = [o.stop] if isinstance(o.stop, str) else o.stop
        return SamplingParams(max_tokens=max_tokens, temperature=value("temperature"), top_k=value("top_k"),
                              top_p=value("top_p"), min_p=value("min_p"), repetition_penalty=value("repeat_penalty"),
                              presence_penalty=value("presence_penalty", 0.0),
                              frequency_penalty=value("frequency_penalty", 0.0), seed=o.seed, stop=stop,
                              penalty_last_n=value("repeat_last_n"), structured_outputs=self.structured())

    def max_tokens(self, room: int) -> int:
        """num_predict as Ollama reads it, a cap: at most the `room` the prompt leaves in the context."""
        n = self.options.num_predict
        if n is not None and n < 1 and n not in (-1, -2):
            raise ValueError(f"options.num_predict must be -1, -2 or at least 1, got {n}")
        if room < 1:
            raise ValueError("the prompt fills the model's whole context: no room is left for an answer")
        return room if n is None or n < 1 else min(n, room)

    def num_keep(self) -> int:
        """Ollama's num_keep (default 4): the prompt's first tokens kept when its middle is cut to fit."""
        n = _whole((self.options.model_extra or {}).get("num_keep"))
        if n is None:
            return 4
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"options.num_keep must be an integer >= 0, got {n!r}")
        return n

    def unloads(self) -> bool:
        """keep_alive 0: Ollama's way to unload a model (here it stays: only the answer says so)."""
        return self.keep_alive in (0, "0", "0s", "0m")


@dataclass
class Ask:
    """What `streams.start` reads of a request: one choice, its sampling, its priority."""
    request: OllamaRequest
    n: int = 1
    priority: int = 0

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return self.request.sampling_params(max_tokens, logprobs)
