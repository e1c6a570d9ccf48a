"""A sequence-classification head: the `score` matrix of transformers' `*ForSequenceClassification`
checkpoints (rerankers and classifiers built on a decoder), applied to the final hidden state of a
prompt's last token, as those models are trained. Kept in fp32 whatever the model's dtype: it is a
few rows of the hidden size, and its outputs are what the user reads."""
from __future__ import annotations

import torch


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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Class logits [..., classes] of hidden rows [..., hidden]."""
        return hidden.float() @ self.weight.T

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits: sigmoid or softmax, as the head was trained."""
        return logits.sigmoid() if self.sigmoid else logits.softmax(-1)
