"""Guides: the grammar side of the sampler. `Grammars` is an engine's: its vocabulary as llguidance
reads it, built at the first structured request (~0.3 s for 49,152 tokens). A `Guide` is one
request's: it masks the tokens its grammar cannot take next, takes in each sampled token, and is
`done` when the grammar is complete (the request then ends with finish reason "stop")."""
from __future__ import annotations

import numpy as np
import torch

from inferlab.structured.params import StructuredOutputsParams


class Guide:
    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        """In place on one row of logits: -inf wherever the grammar cannot go next. (A row wider than
        the vocabulary, padded, has its padding masked too.)"""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:logits.shape[-1]].astype(bool)
        if len(allowed) < logits.shape[-1]:
            allowed = np.concatenate([allowed, np.zeros(logits.shape[-1] - len(allowed), dtype=bool)])
        logits[torch.from_numpy(~allowed).to(logits.device)] = float("-inf")

    def accept(self, token: int) -> None:
        """Take in the token sampled (a token the mask let through; one it did not ends the guide)."""
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (or the guide failed, and ends here)."""
        return self.matcher.is_stopped() or self.matcher.is_error()


class Grammars:
    """`tokenizer`: the model's (its tokenizers backend), `vocab_size`: the logits' width, `eos_ids`:
    the tokens that end a request, which a complete grammar lets through."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._vocab = None

    def guide(self, params: StructuredOutputsParams) -> Guide:
        import llguidance
        if self._vocab is None:
            try:
                self._vocab = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                     eos_token=sorted(self.eos_ids) or None)
            except Exception as e:  # (llguidance raises its own kinds for a vocabulary it cannot take)
                raise ValueError(f"structured outputs cannot use this model's vocabulary: {e}") from None
        matcher = llguidance.LLMatcher(self._vocab, params.lark(), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the structured output's grammar cannot be used: {matcher.get_error()}")
        return Guide(matcher, self.vocab_size)
