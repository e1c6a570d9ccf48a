"""OutputProcessor: a request's new tokens become what its caller sees — logprobs kept, the stop
rules applied token by token, the text detokenized incrementally, a RequestOutput made.

The engine owns the requests and the scheduler; this holds only what each live request needs for
its outputs (its detokenizer and its logprobs so far), added with the request and dropped with it.
"""
from __future__ import annotations

from collections.abc import Callable

from inferlab.detokenizer import IncrementalDetokenizer
from inferlab.model.tokenizer import Tokenizer
from inferlab.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from inferlab.request import Request, RequestStatus
from inferlab.sampler import SampleResult


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: set[int], clock: Callable[[], float]) -> None:
        self.tokenizer, self.eos_token_ids, self.clock = tokenizer, eos_token_ids, clock
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.logprobs: dict[str, list[dict[int, Logprob]]] = {}
        self.prompt_lps: dict[str, list[dict[int, Logprob] | None]] = {}
        self.embeddings: dict[str, list[float] | None] = {}

    def add(self, req: Request) -> None:
        p = req.params
        self.detokenizers[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                                                   p.stop_list, p.include_stop_str_in_output,
                                                                   p.skip_special_tokens)
        if p.logprobs is not None:
            self.logprobs[req.request_id] = []

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)
        self.logprobs.pop(request_id, None)
        self.prompt_lps.pop(request_id, None)
        self.embeddings.pop(request_id, None)

    def emit(self, req: Request, results: list[SampleResult]) -> tuple[list[int], RequestStatus | None]:
        """Take this step's new tokens (already appended) through logprobs and the stop rules, one
        by one: several arrive at once after verified drafts, and those after a stop are dropped."""
        if req.pooling is not None:  # an embedding: its vector is the answer, the token sampled beside it is not
            self.embeddings[req.request_id] = results[0].embedding
            del req.token_ids[req.num_prompt_tokens:]
            return [], RequestStatus.FINISHED_STOPPED
        first = req.num_output_tokens - len(results)  # output tokens before this step
        for j, res in enumerate(results):
            if res.top_logprobs is not None:
                self.logprobs[req.request_id].append(self._entry(res))
            status = self._check_stop(req, res.token_id, first + j + 1)
            if status is not None:
                if j + 1 < len(results):
                    del req.token_ids[len(req.token_ids) - len(results) + j + 1:]
                    req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
                return [r.token_id for r in results[:j + 1]], status
        return [r.token_id for r in results], None

    def _entry(self, res: SampleResult) -> dict[int, Logprob]:
        """A position's logprobs as outputs give them: its top-N, then its token (its rank may be past N)."""
        tok = self.tokenizer
        top = {t: Logprob(v, k + 1, t, tok) for k, (t, v) in enumerate(res.top_logprobs.items())}
        return {**top, res.token_id: Logprob(res.logprob, res.rank, res.token_id, tok)}

    def _prompt_logprobs(self, req: Request) -> list[dict[int, Logprob] | None] | None:
        """The prompt's logprobs, made once every position is scored (the same list for every output after)."""
        if req.prompt_logprobs is None or req.scoring_prompt:
            return None
        if req.request_id not in self.prompt_lps:
            self.prompt_lps[req.request_id] = [None, *map(self._entry, req.prompt_logprobs)]
        return self.prompt_lps[req.request_id]

    def _check_stop(self, req: Request, token: int, num_output: int) -> RequestStatus | None:
        """Apply the stop rules to a new token, the `num_output`-th of the request; a stopping
        token's own text is not output (unless a stop id with include_stop_str_in_output), as in vLLM."""
        detok = self.detokenizers[req.request_id]
        p = req.params
        may_stop = num_output >= p.min_tokens
        if may_stop and token in self.eos_token_ids and not p.ignore_eos:
            return self._end(req, detok, RequestStatus.FINISHED_STOPPED)
        if may_stop and p.stop_token_ids and token in p.stop_token_ids:
            if p.include_stop_str_in_output:
                detok.add_token(token)
            req.stop_reason = token
            return self._end(req, detok, RequestStatus.FINISHED_STOPPED)
        before = len(detok.text)
        detok.add_token(token)
        if may_stop and detok.stops and (stop := detok.find_stop(len(detok.text) - before)) is not None:
            req.stop_reason = stop
            return RequestStatus.FINISHED_STOPPED
        if req.guide is not None and req.guide.done:  # the structured output is complete
            return self._end(req, detok, RequestStatus.FINISHED_STOPPED)
        if num_output >= req.max_tokens:
            return self._end(req, detok, RequestStatus.FINISHED_LENGTH)
        return None

    @staticmethod
    def _end(req: Request, detok: IncrementalDetokenizer, status: RequestStatus) -> RequestStatus:
        """The text an unfinished character held back (U+FFFD) is the answer's last: a stop string in
        it still cuts the text, so no stop string is ever left in an answer."""
        before = len(detok.text)
        detok.flush_pending()
        if detok.stops and (stop := detok.find_stop(len(detok.text) - before)) is not None:
            req.stop_reason = stop
            return RequestStatus.FINISHED_STOPPED
        return status

    def make_output(self, req: Request, new_ids: list[int], error: str | None = None) -> RequestOutput:
        detok = self.detokenizers[req.request_id]
        finished = req.status.finished
        if finished and not isinstance(req.stop_reason, str):  # a stop string already cut the text
            detok.flush_pending()
        delta = detok.pop_delta(finished)
        lps = self.logprobs.get(req.request_id)  # copied below: outputs may be read on another thread
        completion = CompletionOutput(
            index=0, text=detok.text[:detok.sent], token_ids=req.output_token_ids,
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
            logprobs=None if lps is None else list(lps),
            cumulative_logprob=None if lps is None else sum(step[t] for step, t in zip(lps, req.output_token_ids)),
            new_token_ids=new_ids, new_text=delta)
        metrics = RequestMetrics(req.arrival_time, req.first_scheduled_time, req.first_token_time,
                                 self.clock() if finished else None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], finished,
                             req.num_cached_tokens, metrics, error, self._prompt_logprobs(req),
                             self.embeddings.get(req.request_id))
