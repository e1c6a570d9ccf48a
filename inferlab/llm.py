"""LLM: the offline Python API in vLLM's shape — `LLM(...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, KeysView, ValuesView
from dataclasses import fields, replace

from tqdm.auto import tqdm

from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine, PromptType
from inferlab.outputs import RequestOutput
from inferlab.pooling import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingParams,
    ScorePlan,
    ScoringOutput,
    ScoringRequestOutput,
    score_pairs,
)
from inferlab.sampling_params import SamplingParams

_ids = itertools.count()
# vLLM's LLM() arguments that have no meaning here, and what to use instead
VLLM_ONLY = {
    "gpu_memory_utilization": "the KV pool is sized by kv_cache_memory (bytes, or '4GiB') or num_kv_blocks",
    "trust_remote_code": "InferLab runs no code from a checkpoint, only its own model classes: drop it",
    "tokenizer": "the tokenizer is the model's own (its GGUF's, or the tokenizer.json in its folder)",
    "enable_chunked_prefill": "prefill is always chunked (long_prefill_token_threshold caps a prompt's share)",
}


def merge(copies: list[RequestOutput]) -> RequestOutput:
    """The outputs of a prompt's n copies as one RequestOutput, completion j at index j (vLLM's shape)."""
    first = copies[0]
    if len(copies) == 1:
        return first
    outputs = [replace(c.outputs[0], index=j) for j, c in enumerate(copies)]
    error = next((c.error for c in copies if c.error), None)
    return replace(first, outputs=outputs, error=error)


def prompt_list(prompts: PromptType | list[PromptType]) -> list[PromptType]:
    """A list of prompts from one prompt, a list, a tuple (vLLM's), a generator, a map's values..."""
    if isinstance(prompts, (tuple, Iterator, KeysView, ValuesView)):
        prompts = list(prompts)
    if not isinstance(prompts, list) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # one prompt (anything else is refused by name when added)
    return prompts


def per_prompt(given, n: int, cls: type, name: str) -> list:
    """One params object a prompt: `given` as a list or tuple of them, or one (None: the default) for all."""
    params = list(given) if isinstance(given, (list, tuple)) else [given or cls()] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} {name} for {n} prompts")
    for p in params:
        if not isinstance(p, cls):
            raise TypeError(f"{name} must be a {cls.__name__} or a list of them, got {type(p).__name__}")
    return params


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | str = 2048, enable_prefix_caching: bool = True,
                 scheduling_policy: str = "fcfs", loaded=None, draft_loaded=None, **kwargs) -> None:
        unknown = sorted(set(kwargs) - {f.name for f in fields(EngineConfig)})
        if unknown:
            hint = next((VLLM_ONLY[k] for k in unknown if k in VLLM_ONLY), "see EngineConfig for what it takes")
            raise ValueError(f"LLM() takes no argument {unknown[0]!r}: {hint}")
        config = EngineConfig(model=model, dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks,
                              kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              enable_prefix_caching=enable_prefix_caching,
                              scheduling_policy=scheduling_policy, **kwargs)
        self.engine = LLMEngine(config, loaded=loaded, draft_loaded=draft_loaded)
        # one generate() steps the engine at a time: calls from several threads take turns (each
        # stepping the others' requests broke both)
        self._lock = threading.Lock()

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for `engine`."""
        return self.engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """A new SamplingParams() (vLLM's method; a checkpoint's generation_config.json sampling values
        are not read, as vLLM's `generation_config="vllm"`)."""
        return SamplingParams()

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None, use_tqdm: bool | Callable[..., tqdm] = True) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in prompt order, holding `n` completions (each
        prompt is submitted n times, as vLLM's engine forks it: the copies share its cached blocks; a
        seed gives copy j the seed + j). Invalid input raises ValueError before anything runs. Calls
        from several threads take turns; one interrupted (Ctrl-C) aborts its requests."""
        with self._lock:
            return self._generate(prompts, sampling_params, priority, use_tqdm)

    def _generate(self, prompts: PromptType | list[PromptType],
                  sampling_params: SamplingParams | list[SamplingParams] | None, priority: list[int] | None,
                  use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        prompts = prompt_list(prompts)
        n = len(prompts)
        params = per_prompt(sampling_params, n, SamplingParams, "sampling_params")
        if priority is not None and not isinstance(priority, (list, tuple)):
            raise ValueError(f"priority must be a list of integers, one a prompt (vLLM's), got {priority!r}")
        if priority is not None and len(priority) != n:
            raise ValueError(f"got {len(priority)} priorities for {n} prompts")
        for i, p in enumerate(params):
            try:  # n first: a field set after construction counts
                p.validate()
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [[f"offline-{next(_ids)}" for _ in range(p.n)] for p in params]
        final = self._submit(ids, prompts, lambda i, j: params[i].fork(j) if len(ids[i]) > 1 else params[i],
                             priority, use_tqdm)
        return [merge([final[rid] for rid in group]) for group in ids]

    def _submit(self, ids: list[list[str]], prompts: list[PromptType],
                params: Callable[[int, int], SamplingParams | PoolingParams],
                priority: list[int] | None, use_tqdm: bool | Callable[..., tqdm]) -> dict[str, RequestOutput]:
        """Add request ids[i][j] of prompt i with params(i, j) and run them all to their ends. On a bad
        prompt ("prompt i: ..."), KeyboardInterrupt (adding or stepping) or a step observer's error,
        nothing of the call stays, and that error is raised."""
        try:
            for i, group in enumerate(ids):
                for j, rid in enumerate(group):
                    try:
                        self.engine.add_request(rid, prompts[i], params(i, j), priority=priority[i] if priority else 0)
                    except ValueError as e:
                        raise ValueError(f"prompt {i}: {e}") from None
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in itertools.chain.from_iterable(ids):
                with contextlib.suppress(Exception):
                    self.engine.abort_request(rid)
            raise

    def embed(self, prompts: PromptType | list[PromptType],
              pooling_params: PoolingParams | list[PoolingParams] | None = None,
              use_tqdm: bool | Callable[..., tqdm] = True) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding, in prompt order (`out.outputs.embedding`: the final hidden state of
        its last token, normalised by default; see pooling.py). The prompts are scheduled and batched
        as generations are, and share the prefix cache with them."""
        return [EmbeddingRequestOutput.of(o) for o in self._pool(prompts, pooling_params, "embed", use_tqdm)]

    def classify(self, prompts: PromptType | list[PromptType],
                 pooling_params: PoolingParams | list[PoolingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True) -> list[ClassificationRequestOutput]:
        """Each prompt's class probabilities, in prompt order (`out.outputs.probs`, in the order of
        the checkpoint's labels: `LLM.labels`), from a `*ForSequenceClassification` checkpoint's head."""
        return [ClassificationRequestOutput.of(o) for o in self._pool(prompts, pooling_params, "classify", use_tqdm)]

    @property
    def labels(self) -> list[str] | None:
        """The classification head's class names (config.json's id2label); None: the model has none."""
        head = self.engine.model.classifier
        return None if head is None else list(head.labels)

    def score(self, data_1: str | list[str], data_2: str | list[str],
              use_tqdm: bool | Callable[..., tqdm] = True) -> list[ScoringRequestOutput]:
        """How well each pair of texts matches (`out.outputs.score`), vLLM's pairing: one first text
        against each second one, or two lists pair by pair. A reranker's score is its probability
        that the pair is relevant; an embedding model's, the cosine similarity of the two texts."""
        with self._lock:
            plan = ScorePlan.of(score_pairs(data_1, data_2), self.engine.model.classifier, self.engine.tokenizer)
        outs = self._pool([{"prompt_token_ids": ids} for ids in plan.prompts], plan.params, plan.params.task, use_tqdm)
        scores = plan.scores([o.embedding for o in outs])
        pair_outs = outs if plan.pairs is None else [outs[j] for _, j in plan.pairs]
        return [ScoringRequestOutput(o.request_id, plan.tokens(k), ScoringOutput(scores[k]), metrics=o.metrics)
                for k, o in enumerate(pair_outs)]

    def _pool(self, prompts: PromptType | list[PromptType], pooling_params: PoolingParams | list[PoolingParams] | None,
              task: str, use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        """Run each prompt as a pooling request of `task` (the params' own task is replaced by it)."""
        with self._lock:
            prompts = prompt_list(prompts)
            params = [replace(p, task=task)
                      for p in per_prompt(pooling_params, len(prompts), PoolingParams, "pooling_params")]
            ids = [[f"{task}-{next(_ids)}"] for _ in prompts]
            final = self._submit(ids, prompts, lambda i, j: params[i], None, use_tqdm)
            return [final[rid] for (rid,) in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
             chat_template: str | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template (or `chat_template`, a Jinja template of one's own) to one
        conversation or a list of them and generate. `continue_final_message=True` (with
        `add_generation_prompt=False`) continues a last assistant message instead of answering after
        it; `chat_template_kwargs` are more variables for the template (e.g. Qwen3's `enable_thinking`);
        `tools` (OpenAI's, each {"type": "function", "function": {...}}) go to the template, which writes
        them into the prompt; the calls in an answer are the caller's to read (server/tools.py's `hermes`
        reads Qwen's)."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of messages (dicts of role and content) or a list of such "
                             f"lists, not {type(messages).__name__}")
        if not messages:  # no conversations (vLLM's reading): no outputs
            return []
        conversations = messages if isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        if tools is not None:
            chat_template_kwargs = {**(chat_template_kwargs or {}), "tools": tools}
        prompts = [{"prompt": text, "prompt_token_ids": tok.encode_chat(text)}
                   for text in (tok.apply_chat_template(c, add_generation_prompt, continue_final_message,
                                                         chat_template_kwargs, chat_template=chat_template)
                                for c in conversations)]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[list[str]], use_tqdm: bool | Callable[..., tqdm]) -> dict[str, RequestOutput]:
        """Step until every request is done; the bar counts prompts (each done with all its n copies)."""
        engine = self.engine
        final: dict[str, RequestOutput] = {}
        left = {rid: group for group in ids for rid in group}
        make_bar = use_tqdm if callable(use_tqdm) else tqdm  # vLLM's: a tqdm-like function of one's own
        bar = make_bar(total=len(ids), desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        start, prompt0, gen0 = time.perf_counter(), engine.num_prompt_tokens, engine.num_generation_tokens
        pending = set(left)
        # requests added through `engine` by others are stepped, not collected; one of ours aborted there
        # ends the loop (its output is then missing) rather than stepping an idle engine forever
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():  # interrupted too
            while not pending.isdisjoint(engine.requests):
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        final[out.request_id] = out
                        if bar is not None and all(rid in final for rid in left[out.request_id]):
                            bar.update(1)
                if bar is not None:
                    dt = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"prefill {(engine.num_prompt_tokens - prompt0) / dt:.0f} tok/s, "
                                        f"decode {(engine.num_generation_tokens - gen0) / dt:.0f} tok/s",
                                        refresh=False)
        return final
