"""Guides: the grammar side of the sampler. `Grammars` is an engine's: its vocabulary as llguidance
reads it, built at the first structured request (~0.3 s for 49,152 tokens). A `Guide` is one
request's: it takes in each sampled token, and is `done` when the grammar is complete (the request
then ends with finish reason "stop"). `mask_rows` masks a step's guided rows together: llguidance's
threads fill every row's bits of what its grammar can take next, and one op applies them."""
from __future__ import annotations

import numpy as np
import torch

from inferlab.structured.params import StructuredOutputsParams


class Guide:
    def __init__(self, matcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def accept(self, token: int) -> None:
        """Take in the token sampled (a token the mask let through; one it did not ends the guide)."""
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (or the guide failed, and ends here)."""
        return self.matcher.is_stopped() or self.matcher.is_error()


_EXECUTOR = None  # llguidance's thread pool, made at the first batch that needs it


def mask_rows(logits: torch.Tensor, rows: list[tuple[int, Guide]]) -> None:
    """In place: -inf in logits row i wherever guide's grammar cannot go next, for each (i, guide).
    (A row wider than the vocabulary, padded, has its padding masked too.) Two threads fill 64 rows'
    bits in ~0.4 ms, where one row at a time with its own unpacking took ~5 ms in all."""
    global _EXECUTOR
    import llguidance
    vocab = rows[0][1].vocab_size
    bits = np.empty((len(rows), -(-vocab // 32) * 4), dtype=np.uint8)  # the grammars' vocabulary, a bit each
    _EXECUTOR = _EXECUTOR or llguidance.LLExecutor()  # (llguidance.torch's helpers would import torch.compile)
    _EXECUTOR.unsafe_compute_mask_ptr([(g.matcher, k) for k, (_, g) in enumerate(rows)], bits.ctypes.data,
                                      bits.shape[1], len(rows))
    banned = torch.from_numpy(np.unpackbits(~bits, axis=1, bitorder="little").view(bool)[:, :vocab]).to(logits.device)
    for k, (i, _) in enumerate(rows):
        logits[i, :vocab].masked_fill_(banned[k], float("-inf"))
    logits[[i for i, _ in rows], vocab:] = float("-inf")  # a padded row's padding is never drawn


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
