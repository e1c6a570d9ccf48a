"""A sequence-classification head: the `score` matrix of transformers' `*ForSequenceClassification`
checkpoints (rerankers and classifiers built on a decoder), or rows of a causal LM's head that vLLM's
`classifier_from_token` names (Qwen3-Reranker), applied to the final hidden state of a prompt's last
token, as those models are trained. Kept in fp32 whatever the model's dtype: it is a
few rows of the hidden size, and its outputs are what the user reads."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker's head gives the score


class Classifier(torch.nn.Module):
    """`labels[i]` names class i (the config's `id2label`); `multi_label`: each class is a yes/no of
    its own (sigmoid each), else the classes share one softmax. One class is always a sigmoid: a
    cross-encoder's relevance score."""

    def __init__(self, weight: torch.Tensor, labels: list[str], multi_label: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != len(labels):
            raise ValueError(f"score.weight has shape {tuple(weight.shape)}, expected ({len(labels)}, hidden size) "
                             f"for the config's {len(labels)} labels")
        self.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        self.labels = labels
        self.sigmoid = multi_label or len(labels) == 1

    @classmethod
    def from_config(cls, weight: torch.Tensor, cfg: dict) -> Classifier:
        """The head a config.json describes: its labels from `id2label` (or `num_labels`, unnamed),
        `problem_type` saying whether they are independent."""
        names = cfg.get("id2label")
        if isinstance(names, dict) and names:
            labels = [str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(len(names))]
        else:
            labels = [f"LABEL_{i}" for i in range(int(cfg.get("num_labels", weight.shape[0])))]
        return cls(weight, labels, cfg.get("problem_type") == "multi_label_classification")

    @classmethod
    def from_checkpoint(cls, cfg: dict, heads: dict[str, torch.Tensor], tied: bool, named: str) -> Classifier:
        """The head a checkpoint holds: its score.weight (`heads`, by tensor name), or with vLLM's
        `classifier_from_token` rows of its LM head (the embedding's, where `tied`). Qwen3-Reranker's
        (`is_original_qwen3_reranker`, tokens ["no", "yes"]) is one class, yes's row less no's: the
        sigmoid of that difference is P(yes) / (P(yes) + P(no)), the score its model card computes."""
        tokens = cfg.get("classifier_from_token")
        if not tokens:
            if "score.weight" not in heads:
                raise ValueError(f"the checkpoint is missing score.weight, the classification head {named} has")
            return cls.from_config(heads["score.weight"], cfg)
        rows = heads.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        if rows is None:
            raise ValueError("the checkpoint has no LM head to take classifier_from_token's rows from")
        if cfg.get("is_original_qwen3_reranker"):
            if len(tokens) != 2:
                raise ValueError(f"is_original_qwen3_reranker takes two tokens (no, yes), got {len(tokens)}")
            return cls(rows[1:] - rows[:1], [tokens[1]])
        return cls(rows, list(tokens))

    @classmethod
    def from_gguf(cls, weight: torch.Tensor, fields: dict) -> Classifier:
        """A GGUF's head (cls.output, dequantized) with its file's `classifier.output_labels` and
        `pooling_type`. Under llama.cpp's rank pooling, a head of two rows (Qwen3-Reranker's yes and no)
        is the softmax llama.cpp takes the first value of: one class, row 0 less row 1, whose sigmoid
        is that value."""
        labels = [str(x) for x in fields.get("classifier.output_labels") or []] or \
            [f"LABEL_{i}" for i in range(weight.shape[0])]
        if fields.get("pooling_type") == RANK_POOLING and weight.shape[0] == 2:
            return cls(weight[:1] - weight[1:], labels[:1])
        return cls(weight, labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Class logits [..., classes] of hidden rows [..., hidden]."""
        return hidden.float() @ self.weight.T

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits: sigmoid or softmax, as the head was trained."""
        return logits.sigmoid() if self.sigmoid else logits.softmax(-1)


def head_tensors(cfg: dict, tensors: Iterator[tuple], token_to_id: Callable[[str], int | None],
                 into: dict[str, torch.Tensor]) -> Iterator[tuple]:
    """A classification checkpoint's (name, tensor, type) stream for the model, while what its head is
    made of goes to `into` as it passes (see `Classifier.from_checkpoint`): score.weight, taken out;
    or with `classifier_from_token`, those tokens' rows (fp32) of the LM head and the embedding, which
    stay in the stream."""
    tokens = cfg.get("classifier_from_token")
    ids = head_token_ids(tokens, token_to_id) if tokens else None  # (refused now, before any tensor is read)

    def stream() -> Iterator[tuple]:
        for name, tensor, wtype in tensors:
            if ids is None and name == "score.weight":
                into[name] = tensor
                continue
            if ids is not None and name in ("lm_head.weight", "model.embed_tokens.weight"):
                into[name] = tensor[ids].float()
            yield name, tensor, wtype
    return stream()


def head_token_ids(tokens: object, token_to_id: Callable[[str], int | None]) -> list[int]:
    """classifier_from_token's tokens (a field of vLLM's hf_overrides) as the vocabulary's ids."""
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"classifier_from_token must be a list of tokens, got {tokens!r}")
    ids = [token_to_id(t) for t in tokens]
    if None in ids:
        raise ValueError(f"classifier_from_token: {tokens[ids.index(None)]!r} is not a token of this vocabulary")
    return ids
