"""Engine outputs -> OpenAI response bodies and stream chunks (completions and chat), and error bodies."""
from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from fastapi.responses import JSONResponse

from inferlab.detokenizer import IncrementalDetokenizer
from inferlab.model.tokenizer import Tokenizer
from inferlab.outputs import RequestOutput


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def finish_reason(out: RequestOutput) -> str | None:
    return out.outputs[0].finish_reason if out.finished else None


def without_answer(out: RequestOutput) -> RequestOutput:
    """`out` with its choice's answer left out: an echo with max_tokens 0 (the prompt alone, scored),
    which the engine runs as one new token, since its step always samples one. The choice ends as
    max_tokens 0 ends it ("length"), unless it was aborted or failed."""
    c = out.outputs[0]
    ended = c.finish_reason if c.finish_reason in (None, "abort", "error") else "length"
    empty = replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [], cumulative_logprob=None,
                    new_token_ids=[], new_text="", finish_reason=ended, stop_reason=None)
    return replace(out, outputs=[empty])


async def each(change: Callable[[RequestOutput], RequestOutput],
               stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    async for out in stream:
        yield change(out)


def usage(finals: list[RequestOutput], n: int, details: bool = False) -> dict:
    """Prompt tokens count once per prompt (the first of its n choices), completions for all.
    `details`: with the prompt tokens the prefix cache held (vLLM's --enable-prompt-tokens-details). Off
    by default, as vLLM's: a client that guesses another's prompt learns from it, block by block, how
    much it got right."""
    firsts = finals[::n]
    prompt = sum(len(o.prompt_token_ids) for o in firsts)
    completion = sum(len(o.outputs[0].token_ids) for o in finals)
    counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if details:
        counts["prompt_tokens_details"] = {"cached_tokens": sum(o.num_cached_tokens for o in firsts)}
    return counts


def new_logprobs(out: RequestOutput, count: int) -> list[tuple[int, dict[int, float]]]:
    """(sampled token, {token: logprob}) for the last `count` tokens of `out`."""
    c = out.outputs[0]
    if c.logprobs is None or count == 0:
        return []
    ids = c.token_ids[len(c.token_ids) - count:]
    return list(zip(ids, c.logprobs[len(c.logprobs) - count:]))


class TextOffsets:
    """Where each output token's text begins in a choice's text (completions' `text_offset`).

    Counted on the text as detokenized together, not token by token: a piece of a character
    decodes to U+FFFD alone, so summing pieces would run past the text. A piece starts where its
    character does; bytes that begin no character (each a U+FFFD of its own for good) count one
    character each. A whole answer caps them at its text's length (a stop string's tokens have no
    text of their own); a stream cannot know that length yet, so there tokens that a stop then
    cut keep offsets past the text, and only they differ from the whole answer's."""

    def __init__(self, tok: Tokenizer, prompt_ids: list[int]) -> None:
        self.tok = tok
        self.detok = IncrementalDetokenizer(tok, prompt_ids, [])

    def _settled(self) -> int:
        """Characters of the text the detokenizer holds back (for the U+FFFD it ends in) that no
        later token can change: all but an unfinished character's first bytes."""
        d = self.detok
        if d.read_offset == len(d.ids):
            return 0
        held = self.tok.text(d.ids[d.prefix_offset:])[len(self.tok.text(d.ids[d.prefix_offset:d.read_offset])):]
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        utf8.decode(b"".join(self.tok.token_bytes(t) for t in d.ids[d.read_offset:]))
        return max(0, len(held) - (1 if utf8.getstate()[0] else 0))

    def take(self, token_ids: list[int], text_len: int | None = None) -> list[int]:
        offsets = []
        for token_id in token_ids:
            at = len(self.detok.text) + self._settled()
            offsets.append(at if text_len is None else min(at, text_len))
            self.detok.add_token(token_id)
        return offsets


def completion_logprobs(tok: Tokenizer, entries: list[tuple[int, dict[int, float]]], top_n: int,
                        offsets: list[int]) -> dict:
    tokens, token_lps, tops = [], [], []
    for token_id, lps in entries:
        tokens.append(tok.token_text(token_id))
        token_lps.append(lps[token_id])
        # the sampled token first, as OpenAI's legacy API returns it beside the best N (so up to N + 1
        # entries; one for logprobs 0); tokens that decode alike (pieces of characters) share a key:
        # the sampled one keeps it, else the likelier
        top = {tokens[-1]: lps[token_id]}
        for t, lp in sorted(lps.items(), key=lambda kv: -kv[1])[:top_n]:
            top.setdefault(tok.token_text(t), lp)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, entries: list[tuple[int, dict[int, float]]], top_n: int) -> dict:
    def item(token_id: int, lp: float) -> dict:
        # bytes as the token stands for them: a piece of a character has no text of its own
        return {"token": tok.token_text(token_id), "logprob": lp, "bytes": list(tok.token_bytes(token_id))}

    content = []
    for token_id, lps in entries:
        best = sorted(lps.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**item(token_id, lps[token_id]), "top_logprobs": [item(t, lp) for t, lp in best]})
    return {"content": content}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def prompt_logprobs(tok: Tokenizer, out: RequestOutput) -> list | None:
    """A completion choice's `prompt_logprobs` as vLLM writes them: None for the first prompt token,
    then per token {token id: {logprob, rank, decoded_token}}, its top-N and itself."""
    if out.prompt_logprobs is None:
        return None
    def entry(t: int, lp) -> dict:
        return {"logprob": float(lp), "rank": lp.rank, "decoded_token": tok.token_text(t)}
    return [None if step is None else {str(t): entry(t, lp) for t, lp in step.items()} for step in out.prompt_logprobs]


class Echo:
    """Completions' `echo`: the prompt's text before a choice's first text and, with logprobs, its
    tokens before the answer's (the first token's logprob null, as nothing predicts it), the
    answer's text offsets moved past the prompt's text."""

    def __init__(self, tok: Tokenizer, top_n: int | None) -> None:
        self.tok, self.top_n = tok, top_n

    def __call__(self, out: RequestOutput, text: str, lps: dict | None, first: bool) -> tuple[str, dict | None]:
        ids = out.prompt_token_ids
        prompt = out.prompt if out.prompt is not None else self.tok.text(ids)
        if lps is not None:
            lps = {**lps, "text_offset": [at + len(prompt) for at in lps["text_offset"]]}
            if first:
                at = TextOffsets(self.tok, []).take(ids, len(prompt))
                scored = out.prompt_logprobs[1:] if out.prompt_logprobs is not None else []
                k = len(ids) - len(scored)  # tokens without a logprob: the first, or a failed request's all
                head = {"tokens": [self.tok.token_text(t) for t in ids[:k]], "token_logprobs": [None] * k,
                        "top_logprobs": [None] * k, "text_offset": at[:k]}
                rest = completion_logprobs(self.tok, list(zip(ids[k:], scored)), self.top_n, at[k:])
                lps = {key: head[key] + rest[key] + lps[key] for key in head}
        return (prompt + text if first else text), lps
