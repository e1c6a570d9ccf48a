"""Embeddings: a prompt's vector, pooled from the model's last hidden states (vLLM's pooling API).

An embedding request runs its prompt through the engine like any other (scheduled, chunked, read
from the prefix cache, batched beside generations) and ends at its last prompt token: the final
norm's output at that row is the embedding, L2-normalised unless asked not to be. That is vLLM's
`LAST` pooling, the one decoder embedding models such as Qwen3-Embedding are trained for; a plain
LM's vector is usable for similarity but was not trained for it. `LLM.embed`, the server's
`/v1/embeddings` and Ollama's `/api/embed` all go through `PoolingParams`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from inferlab.outputs import RequestMetrics, RequestOutput


@dataclass
class PoolingParams:
    """How a prompt's vector is made. `normalize`: scaled to length 1 (vLLM's and OpenAI's default).
    `dimensions`: the vector's length, which must be the model's hidden size (shorter vectors need
    a model trained for them, matryoshka-style, which no checkpoint says it is here)."""

    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, hidden_size: int | None = None) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}")
        if d is not None and hidden_size is not None and d != hidden_size:
            raise ValueError(f"dimensions={d}: this model's embeddings have {hidden_size} dimensions, and it was "
                             "not trained for shorter ones (matryoshka)")

    def pool(self, hidden: torch.Tensor) -> list[float]:
        """The vector of one last-token row of final hidden states."""
        v = hidden.float()
        if self.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v.tolist()


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    def __repr__(self) -> str:  # (vLLM's: hundreds of floats would bury the rest of an output's repr)
        return f"EmbeddingOutput(hidden_size={self.hidden_size})"


@dataclass
class EmbeddingRequestOutput:
    """One prompt's embedding, in vLLM's shape: `out.outputs.embedding`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    prompt: str | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None

    @classmethod
    def of(cls, out: RequestOutput) -> EmbeddingRequestOutput:
        """The engine's output of a finished embedding request."""
        return cls(out.request_id, out.prompt_token_ids, EmbeddingOutput(out.embedding or []), out.finished,
                   out.prompt, out.num_cached_tokens, out.metrics, out.error)
