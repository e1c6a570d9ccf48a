"""SpeculativeConfig: vLLM's `speculative_config` dict (or its JSON) as one validated dataclass.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4,
     "quantization": "auto", "int8_activations": true, "share_kv": null}

Bad values raise one-line `ValueError`s here; a draft whose vocabulary differs from the target's is
refused when the draft is loaded (`draft.py`), the first moment both vocabularies are known.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from inferlab.json_config import check_types, json_object
from inferlab.model.layers.keep import quantization_mode

METHODS = ("ngram", "draft_model")
# A verify step computes 1 + k rows per sequence; the native row kernel (and so the decode tape)
# takes a sequence's rows while they are at most 16, so k stays below that.
MAX_SPECULATIVE_TOKENS = 15


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # ngram: the shortest suffix worth matching
    prompt_lookup_max: int | None = None  # ngram: the longest suffix tried first
    # draft_model: a GGUF file or HF folder sharing the target's tokenizer ("embedded": the embedded GGUF)
    model: str | None = None
    quantization: str = "auto"  # draft_model: its weights, as EngineConfig.quantization
    int8_activations: bool = False  # draft_model: as EngineConfig.int8_activations
    # draft_model: read the K/V the target computed instead of computing its own (draft.py); None:
    # when the draft is the target's own checkpoint (a quantized copy), whose K/V has its shape
    share_kv: bool | None = None
    # Speculation stops while more requests than this decode in one step. None: for ngram 64 // (1 + k)
    # (12 at k = 4): a batch that large already keeps the CPU busy, and its verify rows would fall off
    # the one-call decode step (64 rows). For a draft model 10 // (1 + k) (2 at k = 4): its steps cost
    # rows too (int8 rows scale almost linearly on AVX2), and a Q4_1 self-draft measured 1.60x alone
    # but 0.96x at 4 decodes (experiment 11).
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {self.method!r}")
        check_types(self, "speculative_config ")
        k = self.num_speculative_tokens
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:  # an int: check_types said so
            raise ValueError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.method == "ngram":
            # vLLM's defaults: one bound given sets the other; neither gives 5 and 5
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            self.prompt_lookup_min = lo if lo is not None else (hi if hi is not None else 5)
            self.prompt_lookup_max = hi if hi is not None else self.prompt_lookup_min
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not isinstance(lo, int) or not isinstance(hi, int) or not 1 <= lo <= hi:
                raise ValueError(f"ngram needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}")
        elif not self.model:
            raise ValueError("speculative_config method 'draft_model' needs a 'model' (a GGUF file or HF folder)")
        self.quantization = quantization_mode(self.quantization, "speculative_config quantization")
        if self.disable_by_batch_size is None:
            self.disable_by_batch_size = max(1, (64 if self.method == "ngram" else 10) // (1 + k))
        elif self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be an integer >= 1, got {self.disable_by_batch_size!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From a dict, its JSON text, or an instance (returned as is); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        value = json_object(value, "speculative_config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        value = dict(value)
        if "method" not in value and value.get("model"):  # vLLM infers a draft model from 'model'
            value["method"] = "draft_model"
        for key in ("method", "num_speculative_tokens"):
            if key not in value:
                raise ValueError(f"speculative_config needs {key!r}")
        return cls(**value)
