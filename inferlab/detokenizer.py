"""IncrementalDetokenizer: text from a growing list of token ids, with stop strings, for streaming.

Decoding a token alone can be wrong (a UTF-8 character split over tokens, tokenizers whose
spaces depend on the previous token), so each new token is decoded together with the tokens
just before it and only the difference is taken, as vLLM does. Text that might be the start
of a stop string is held back until it is known not to be one.
"""
from __future__ import annotations

from inferlab.model.tokenizer import Tokenizer

CONTEXT_TOKENS = 6  # prompt tokens decoded along with the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str],
                 include_stop: bool = False, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        # the text of token ids: special tokens left out (vLLM's default), or kept
        self.decode = tokenizer.text if skip_special else lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        if self.ids and not tokenizer.text(self.ids):
            # only special tokens (a BOS): the output would start the decoded text, where a
            # SentencePiece decoder strips the space of its first token; a word before it keeps that
            self.ids = tokenizer.encode("a", add_special_tokens=False) + self.ids
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stops, self.include_stop = stops, include_stop
        self.text = ""
        self.sent = 0  # characters of text already handed out

    def add_token(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def find_stop(self, new_chars: int) -> str | None:
        """Search the newest text for a stop string; on a hit truncate the text and return it."""
        for stop in self.stops:
            begin = max(0, len(self.text) - new_chars - len(stop) + 1)
            idx = self.text.find(stop, begin)
            if idx != -1:
                self.text = self.text[:idx + len(stop) if self.include_stop else idx]
                return stop
        return None

    def flush_pending(self) -> None:
        """At the end, decode whatever an unfinished character held back."""
        tail = self.decode(self.ids[self.prefix_offset:])
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        if len(tail) > len(prefix):
            self.text += tail[len(prefix):]
        self.read_offset = self.prefix_offset = len(self.ids)

    def pop_delta(self, finished: bool) -> str:
        end = len(self.text)
        unsent = end - self.sent
        if not finished and unsent:  # keep back a tail that could still grow into a stop string
            last = self.text[-1]
            for stop in self.stops:
                # bound k by all unsent text, not by `end`: an earlier stop may already have
                # lowered `end`, and a longer prefix of this stop must still be held back.
                # Only prefixes ending in the text's last character can match: rfind jumps to them
                # (and its first character is checked before a slice is compared).
                k = min(len(stop) - 1, unsent)
                while k > 0 and (k := stop.rfind(last, 0, k) + 1) > 0:
                    if self.text[-k] == stop[0] and self.text.endswith(stop[:k]):
                        end = min(end, len(self.text) - k)
                        break
                    k -= 1
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
