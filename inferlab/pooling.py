"""Pooling: a prompt's vector from the model's last hidden states (vLLM's pooling API): an
embedding, or a classification head's classes.

A pooling request runs its prompt through the engine like any other (scheduled, chunked, read from
the prefix cache, batched beside generations) and ends at its last prompt token, whose final norm
output is pooled (vLLM's `LAST` pooling, the one most decoder embedding and reranking models are
trained for). A model whose checkpoint asks for `MEAN` pooling (a sentence-transformers folder's
Pooling module, a GGUF's pooling_type) embeds the mean of every prompt row's output instead: such a
request computes its whole prompt (no prefix-cache hits), and each step adds the rows it computed
(`mean_spans`, `add_rows`). `task="embed"`: that vector, L2-normalised unless asked not to be (a
plain LM's vector is usable for similarity but was not trained for it). `task="classify"`: a
`*ForSequenceClassification` checkpoint's head applied to the last row (model/layers/classifier.py),
as probabilities unless `use_activation=False`. `LLM.embed`/`classify`/`score`, `/v1/embeddings`,
`/classify`, `/score`, `/rerank` and Ollama's `/api/embed` all go through `PoolingParams`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferlab.model.layers.classifier import Classifier
from inferlab.outputs import RequestMetrics, RequestOutput

TASKS = ("embed", "classify")
POOLING_TYPES = ("LAST", "MEAN")  # vLLM's names; a classification head always reads the last row


def mean_spans(scheduled: list) -> np.ndarray | None:
    """[S, 2] int64: the prompt positions [lo, hi) whose rows each mean-pooled sequence adds this step
    (lo = hi where none); None where no sequence adds any."""
    pooling = [i for i, (req, _) in enumerate(scheduled) if req.pooled is not None]
    if not pooling:
        return None
    spans = np.zeros((len(scheduled), 2), dtype=np.int64)
    for i in pooling:
        req, n = scheduled[i]
        lo = max(req.num_computed_tokens, req.pooled_upto)  # a position computed again is added once
        spans[i] = lo, max(lo, min(req.num_computed_tokens + n, req.num_prompt_tokens))
    return spans if (spans[:, 1] > spans[:, 0]).any() else None


def add_rows(scheduled: list, spans: np.ndarray, rows: torch.Tensor) -> None:
    """Add the step's rows of those positions (sequence after sequence) to their requests' sums."""
    at = 0
    for (req, _), (lo, hi) in zip(scheduled, spans):
        if hi > lo:
            req.pooled += rows[at:at + hi - lo].float().sum(0)
            req.pooled_upto, at = int(hi), at + int(hi - lo)


@dataclass
class PoolingParams:
    """How a prompt's vector is made. `normalize`: scaled to length 1 (vLLM's and OpenAI's default).
    `dimensions`: the vector's length, which must be the model's hidden size (shorter vectors need
    a model trained for them, matryoshka-style, which no checkpoint says it is here)."""

    normalize: bool = True
    dimensions: int | None = None
    task: str = "embed"  # or "classify": the classification head's outputs (`LLM.classify` sets it)
    use_activation: bool = True  # classify: probabilities (softmax, or sigmoid per class); False: logits

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, hidden_size: int | None = None, classifier: Classifier | None | bool = False) -> None:
        """`classifier`: the model's head (None: it has none; False: not known yet)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("normalize", "use_activation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.task == "classify" and classifier is None:
            raise ValueError("this model has no classification head (the score.weight of a *ForSequenceClassification "
                             "checkpoint): it can embed, not classify or rerank")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}")
        if d is not None and hidden_size is not None and d != hidden_size:
            raise ValueError(f"dimensions={d}: this model's embeddings have {hidden_size} dimensions, and it was "
                             "not trained for shorter ones (matryoshka)")

    def pool(self, hidden: torch.Tensor, classifier: Classifier | None = None) -> list[float]:
        """The vector of one last-token row of final hidden states (classes: through `classifier`)."""
        if self.task == "classify":
            logits = classifier(hidden)
            return (classifier.activate(logits) if self.use_activation else logits).tolist()
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
class ClassificationOutput:
    probs: list[float]  # (logits, with use_activation=False)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    """One prompt's pooled output, in vLLM's shape: `out.outputs` is an EmbeddingOutput (`.embedding`),
    a ClassificationOutput (`.probs`) or a ScoringOutput (`.score`)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput | ClassificationOutput | ScoringOutput
    finished: bool = True
    prompt: str | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None

    @classmethod
    def of(cls, out: RequestOutput, outputs: EmbeddingOutput | ClassificationOutput | ScoringOutput | None = None):
        """The engine's output of a finished pooling request (`outputs`: what to say instead of its vector)."""
        return cls(out.request_id, out.prompt_token_ids, outputs or cls.wrap(out.embedding or []), out.finished,
                   out.prompt, out.num_cached_tokens, out.metrics, out.error)

    @staticmethod
    def wrap(vector: list[float]):
        return EmbeddingOutput(vector)


class EmbeddingRequestOutput(PoolingRequestOutput):
    """`out.outputs.embedding`: the vector."""


class ClassificationRequestOutput(PoolingRequestOutput):
    """`out.outputs.probs`: the class probabilities."""

    @staticmethod
    def wrap(vector: list[float]):
        return ClassificationOutput(vector)


class ScoringRequestOutput(PoolingRequestOutput):
    """`out.outputs.score`: how well the pair matches (a cross-encoder's probability, or the cosine
    similarity of the two texts' embeddings)."""


def score_pairs(data_1: str | list[str], data_2: str | list[str],
                names: tuple[str, str] = ("data_1", "data_2")) -> list[tuple[str, str]]:
    """The pairs vLLM's score API makes: one first text against each second one, or two lists of
    texts pair by pair. `names`: what the caller calls the two sides, for its errors."""
    firsts = [data_1] if isinstance(data_1, str) else list(data_1)
    seconds = [data_2] if isinstance(data_2, str) else list(data_2)
    for name, texts in zip(names, (firsts, seconds)):
        if not texts:
            raise ValueError(f"{name} is empty: give at least one text")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{name} must hold strings, got {type(bad).__name__}")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(f"{names[0]} has {len(firsts)} texts and {names[1]} {len(seconds)}: give one first text, "
                         "or as many as there are second ones")
    return list(zip(firsts, seconds))


@dataclass
class ScorePlan:
    """How a model scores pairs of texts, as vLLM does. A reranker (a classification head of one
    class) reads each pair as one prompt, the tokenizer's pair encoding, and its probability is the
    score. Any other model embeds each distinct text once, and a pair's score is the cosine
    similarity of its two vectors. Run `prompts` with `params`, then `scores(vectors)`."""

    prompts: list[list[int]]
    params: PoolingParams
    pairs: list[tuple[int, int]] | None  # embeddings: each pair's two prompts; None: prompt i is pair i

    @classmethod
    def of(cls, pairs: list[tuple[str, str]], classifier: Classifier | None, tokenizer) -> ScorePlan:
        if classifier is not None:
            if len(classifier.labels) != 1:
                raise ValueError(f"this model's head has {len(classifier.labels)} classes, and scoring pairs "
                                 "takes a reranker's one: classify reads them")
            return cls([tokenizer.encode_pair(a, b) for a, b in pairs], PoolingParams(task="classify"), None)
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        at = {t: i for i, t in enumerate(texts)}
        return cls([tokenizer.encode(t) for t in texts], PoolingParams(), [(at[a], at[b]) for a, b in pairs])

    def scores(self, vectors: list[list[float]]) -> list[float]:
        if self.pairs is None:
            return [v[0] for v in vectors]
        return [float(torch.tensor(vectors[i]) @ torch.tensor(vectors[j])) for i, j in self.pairs]  # unit vectors

    def tokens(self, k: int) -> list[int]:
        """Pair k's prompt ids (both texts' where they ran apart)."""
        if self.pairs is None:
            return self.prompts[k]
        i, j = self.pairs[k]
        return [*self.prompts[i], *self.prompts[j]]
