"""CostModel: how long one engine step takes, as a linear function of what the step does.

    seconds = base + per_prefill_token * prefill tokens + per_decode_seq * decode sequences
                   + per_context_token * context tokens read by attention

`inferlab calibrate` fits it to timed steps of the real model on this machine; the simulator
then advances its virtual clock by it instead of running the model.

Preemption costs follow from it. A request recomputed after preemption pays for its prefill
tokens again, at the per-token cost above: compute, proportional to FLOPs. A swapped one pays
`per_swap_byte` for every byte of K/V copied out to the host pool and back: proportional to
bytes (`kv_bytes_per_token` is the model's K/V size, all layers, in the pool's dtype).
"""
from __future__ import annotations

import json
import sys
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np

from inferlab.request import Request


@dataclass
class StepFeatures:
    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0

    @classmethod
    def of(cls, scheduled: list[tuple[Request, int]]) -> StepFeatures:
        """Features of a scheduled batch, read before the step advances the requests."""
        f = cls()
        for req, n in scheduled:
            if n == 1 and req.num_computed_tokens >= req.num_prompt_tokens:
                f.decode_seqs += 1
            else:
                f.prefill_tokens += n
            f.context_tokens += req.num_computed_tokens + n
        return f


@dataclass
class CostModel:
    base: float
    per_prefill_token: float
    per_decode_seq: float
    per_context_token: float
    # K/V copied between the pool and a host pool: measured by calibrate; this default on the 2-core
    # development machine under load (0.53 GB/s out and back, float32)
    per_swap_byte: float = 1.9e-9
    kv_bytes_per_token: int = 46080  # the embedded model in float32: 2 (K, V) x 30 layers x 3 heads x 64 x 4 B

    def __post_init__(self) -> None:
        for f in fields(self):  # a step never takes negative time: fit() keeps every coefficient >= 0 too
            value = getattr(self, f.name)
            # (an integer past a float's range passed, then was an OverflowError mid-run)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= sys.float_info.max:
                raise ValueError(f"cost model {f.name} must be a number >= 0, got {value!r}")
        bytes_ = self.kv_bytes_per_token  # it divides a pool's bytes into tokens
        if isinstance(bytes_, float) or bytes_ < 1:
            raise ValueError(f"cost model kv_bytes_per_token must be a whole number of bytes >= 1, got {bytes_!r}")

    def swap_seconds(self, num_blocks: int, block_size: int) -> float:
        return self.per_swap_byte * self.kv_bytes_per_token * block_size * num_blocks

    def step_time(self, f: StepFeatures) -> float:
        return (self.base + self.per_prefill_token * f.prefill_tokens + self.per_decode_seq * f.decode_seqs
                + self.per_context_token * f.context_tokens)

    @staticmethod
    def design(samples: list[tuple[StepFeatures, float]]) -> np.ndarray:
        """The fit's rows: a constant, then each step's features, in the coefficients' order."""
        return np.array([[1.0, f.prefill_tokens, f.decode_seqs, f.context_tokens] for f, _ in samples]).reshape(-1, 4)

    @classmethod
    def fit(cls, samples: list[tuple[StepFeatures, float]]) -> CostModel:
        """Least squares over (features, seconds); a coefficient that comes out negative (noise)
        is fixed at 0 and the rest refitted, so the model never predicts time going backwards."""
        if len(samples) < 4:
            raise ValueError(f"need at least 4 timed steps to fit a cost model, got {len(samples)}")
        x = cls.design(samples)
        y = np.array([t for _, t in samples])
        active = [0, 1, 2, 3]
        while True:
            coef = np.zeros(4)
            coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                return cls(*(float(c) for c in coef))
            active = [i for i in active if i not in negative]
            if not active:
                return cls(float(y.mean()), 0.0, 0.0, 0.0)

    def median_error(self, samples: list[tuple[StepFeatures, float]]) -> float:
        """The median of |predicted - timed| / timed over the samples: how well the model explains
        them (a few percent on a quiet machine; far more when another job shared the cores)."""
        errors = sorted(abs(self.step_time(f) - t) / t for f, t in samples if t > 0)
        return errors[len(errors) // 2] if errors else float("nan")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str) -> CostModel:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # (ValueError: JSON's errors, and a file that is not UTF-8)
            raise ValueError(f"cannot read cost model {path}: {e}") from None
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if not isinstance(data, dict) or set(data) - set(names) or set(required) - set(data):
            raise ValueError(f"cost model {path}: expected an object with {', '.join(required)} (and optionally "
                             f"{', '.join(n for n in names if n not in required)}), as `inferlab calibrate` writes")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


# Fitted by `inferlab calibrate` on the 2-core development machine (embedded model, float32).
DEFAULT = CostModel(base=0.0450, per_prefill_token=1.107e-3, per_decode_seq=1.438e-3, per_context_token=1.386e-5)
