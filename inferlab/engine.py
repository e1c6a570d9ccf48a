"""LLMEngine: the step-by-step API a server or dashboard drives — add_request, step, abort_request.

One step = schedule, run the model on the scheduled tokens, append sampled tokens, turn them into
outputs (`OutputProcessor`: logprobs, stop rules, text) and free what finished. Bad requests are
refused at `add_request` with a one-line `ValueError`, before they touch the scheduler, so they
cannot harm others.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch

from inferlab.budget import StepBudget
from inferlab.config import EngineConfig
from inferlab.distributed.executor import TensorParallelExecutor
from inferlab.engine_log import log_start, notify
from inferlab.engine_model import engine_model
from inferlab.inputs import PromptType, bad_word_ids, check_request, check_request_id, parse_prompt, truncated
from inferlab.isolation import execute_isolating
from inferlab.kv_pool import host_swap_blocks, kv_pool_blocks
from inferlab.kv_swap import HostKVPool
from inferlab.kv_transfer import make_connector, store_namespace
from inferlab.malloc import give_back_when_freed, keep_freed_memory
from inferlab.model.llama import LlamaForCausalLM
from inferlab.model.loader import model_name
from inferlab.model.tokenizer import Tokenizer
from inferlab.output_processor import OutputProcessor
from inferlab.outputs import RequestOutput
from inferlab.policy import make_queue
from inferlab.pooling import PoolingParams
from inferlab.radix_cache import PREFIX_CACHES
from inferlab.request import Request, RequestStatus
from inferlab.runner import ModelRunner
from inferlab.sampler import request_generator
from inferlab.sampling_params import SamplingParams
from inferlab.scheduler import Scheduler
from inferlab.spec_decode.speculator import Speculator
from inferlab.structured import Grammars
from inferlab.threads import ThreadGovernor, default_threads, fixed_threads


class LLMEngine:
    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic,
                 loaded: tuple[LlamaForCausalLM, Tokenizer] | None = None,
                 draft_loaded: tuple[LlamaForCausalLM, Tokenizer] | None = None) -> None:
        """`loaded` passes an already loaded (model, tokenizer) to share read-only weights
        between engines (tests, experiments); otherwise `config.model` is loaded. `draft_loaded`
        does the same for a speculative draft model."""
        self.config = config
        self.draft_loaded = draft_loaded
        if config.num_threads is not None:
            torch.set_num_threads(fixed_threads(config.num_threads))  # process-wide: the model is its main user
        else:
            default_threads()  # a container's CPU quota, which PyTorch does not see
        self.model, self.tokenizer, self.device, executor = engine_model(config, loaded)
        try:
            self._start(config, executor, clock)
        except BaseException:
            if executor is not None:
                executor.shutdown()
            raise

    def _start(self, config: EngineConfig, executor: TensorParallelExecutor | None,
               clock: Callable[[], float]) -> None:
        if self.device.type == "cpu":
            keep_freed_memory()  # no page-fault storm each step for activations freed by the last one
            give_back_when_freed(self)
        # CPU threads follow the cores other processes leave free, unless fixed by num_threads (or
        # split between tensor-parallel ranks, which meet at every all-reduce and so must not lag)
        self.threads = ThreadGovernor() if config.num_threads is None and self.device.type == "cpu" \
            and executor is None else None
        args = self.model.args
        self.dtype = self.model.dtype
        if config.max_model_len is not None and config.max_model_len > args.max_position:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context "
                             f"length {args.max_position}")
        self.max_model_len = config.max_model_len or args.max_position
        self.pooling_type = config.pooling_type or self.model.pooling_type
        num_blocks, per_block = kv_pool_blocks(config, args, self.dtype, self.device)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self.block_manager = PREFIX_CACHES[config.prefix_cache](
            num_blocks, config.block_size, config.enable_prefix_caching,
            model=f"{model_name(config.model)}:{str(self.dtype).removeprefix('torch.')}")
        num_host_blocks = host_swap_blocks(config, num_blocks, per_block, self.device)
        self.scheduler = Scheduler(config, self.block_manager, make_queue(config.scheduling_policy,
                                   config.sjf_aging_rate), clock, num_host_blocks)
        # max_num_batched_tokens="auto": the budget follows the measured step time
        self.budget = StepBudget(config.step_time_target) if config.max_num_batched_tokens == "auto" else None
        native = config.attention_backend != "torch"
        self.runner = executor.start(num_blocks, config.block_size, self.eos_token_ids, native,
                                     config.kv_cache_prefault) if executor else \
            ModelRunner(self.model, num_blocks, config.block_size, self.eos_token_ids, native,
                        fused=not config.enforce_eager, prefault=config.kv_cache_prefault)
        self.host_pool = HostKVPool(self.runner, num_host_blocks)  # allocated by the first swap, if any
        kv = config.kv_transfer_config
        self.kv_connector = None if kv is None else make_connector(
            kv, self.runner, self.block_manager, store_namespace(config, self.block_manager.model, self.model.args))
        if self.kv_connector is not None:
            self.scheduler.attach_connector(self.kv_connector)
        spec = config.speculative_config
        self.speculator = Speculator.build(spec, self, self.draft_loaded) if spec is not None else None
        if config.attention_backend == "native" and self.runner.native is None:
            raise ValueError(f"attention_backend 'native' cannot run this model: {self.runner.native_refusal}")
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.seeds = random.Random(config.seed)  # the seeds of requests that set none
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, clock)
        self.grammars = Grammars(self.tokenizer, self.model.args.vocab_size, self.eos_token_ids)
        self.num_prompt_tokens = 0  # prefill tokens computed (cache hits excluded)
        self.num_prompt_tokens_seen = 0  # whole prompts, counted at each request's first token (vLLM's metric)
        self.num_generation_tokens = 0
        self.last_step_tokens = 0  # tokens the last step computed (prefill + decode)
        # Called with each step's outputs after the step (a recorder, a dashboard feed); empty
        # unless someone watches, so watching costs nothing when nobody does.
        self.step_observers: list[Callable[[list[RequestOutput]], None]] = []
        log_start(self, num_blocks, per_block)

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can hold: context and pool both bound it."""
        return min(self.max_model_len, self.block_manager.num_blocks * self.config.block_size)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> Request:
        """A generation (SamplingParams), or with PoolingParams an embedding or the classes of the
        prompt: its one output carries that vector as `embedding` (pooling.py)."""
        params = params or SamplingParams()
        pooling = None
        if isinstance(params, PoolingParams):  # scheduled as a one-token greedy generation that pools its row
            params.validate(self.model.args.hidden_size, self.model.classifier)
            pooling, params = params, SamplingParams(max_tokens=1, temperature=0.0)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams or a PoolingParams, not {type(params).__name__}")
        params.validate()
        if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, (int, float))
                                         or not math.isfinite(arrival_time)):  # the policies' keys compare it
            raise ValueError(f"arrival_time must be a finite number of seconds, got {arrival_time!r}")
        check_request_id(request_id, self.requests)
        inputs = parse_prompt(prompt, self.tokenizer, self.model.args.vocab_size)
        inputs.token_ids = truncated(inputs.token_ids, params.truncate_prompt_tokens, self.max_request_tokens)
        check_request(inputs, params, priority, self.model.args.vocab_size, self.max_model_len, self.max_request_tokens)
        ids = inputs.token_ids
        room = self.max_request_tokens - len(ids)
        max_tokens = min(params.max_tokens or room, room)
        req = Request(request_id, ids, params, self.clock() if arrival_time is None else arrival_time,
                      max_tokens=max_tokens, priority=priority, prompt=inputs.text, cache_salt=inputs.cache_salt,
                      pooling=pooling)
        if pooling is not None and pooling.task == "embed" and self.pooling_type == "MEAN":
            req.pooled = torch.zeros(self.model.args.hidden_size, device=self.device)
        req.bad_words = bad_word_ids(self.tokenizer, params.bad_words or [])
        if params.structured_outputs is not None:
            if self.speculator is not None:  # its drafts are verified unmasked
                raise ValueError("structured outputs are not supported with speculative decoding")
            req.guide = self.grammars.guide(params.structured_outputs)
        seed = params.seed if params.seed is not None else self.seeds.getrandbits(63)
        req.generator = request_generator(seed, self.device)
        self.scheduler.add_request(req)  # first: if it refuses the request (out of KV memory), nothing is kept
        try:
            self.requests[request_id] = req
            self.output_processor.add(req)
        except BaseException:  # Ctrl-C between the two: no request half added, which no abort could end
            self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
            self._forget(req)
            raise
        return req

    def abort_request(self, request_id: str | list[str], error: str | None = None) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (finish_reason "abort", or
        "error" with `error` when a failure stops it), or None if no such request is live. A list of
        ids (vLLM's form) stops each; returns None."""
        if not isinstance(request_id, str):
            for rid in request_id:
                self.abort_request(rid, error)
            return None
        req = self.requests.get(request_id)
        if req is None:
            return None
        status = RequestStatus.FINISHED_ABORTED if error is None else RequestStatus.FINISHED_ERROR
        self.scheduler.finish_request(req, status)
        out = self.output_processor.make_output(req, [], error)
        self._forget(req)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that produced a token."""
        if self.threads is not None:
            self.threads.update()
        if self.budget is not None:
            self.scheduler.max_num_batched_tokens = self.budget.for_step(len(self.scheduler.running))
        start = time.perf_counter()
        kv = self.kv_connector
        if kv is not None:  # KV loaded since the last step: those requests join this one
            self.scheduler.finish_loads(kv.get_finished().recving)
        if self.speculator is not None:  # drafts for some decodes, verified by this step
            self.speculator.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        self.host_pool.copy(out.swap_out, out.swap_in)  # before the model reads or overwrites those blocks
        self.last_step_tokens = out.num_tokens
        meta = kv.build_connector_meta(out.scheduled) if kv is not None else None
        if kv is not None:
            kv.start_load_kv(meta)
        if not out.scheduled:
            if kv is not None:
                kv.wait_for_load(0.01)  # only loads pending: wait on them rather than spin
            return []
        results, failed = execute_isolating(self.runner, out.scheduled)
        if kv is not None:
            kv.save_kv(meta, {req.request_id for req, _ in failed})
        outputs = []
        for req, error in failed:
            out.scheduled.remove(next(item for item in out.scheduled if item[0] is req))
            self.scheduler.finish_request(req, RequestStatus.FINISHED_ERROR)
            outputs.append(self.output_processor.make_output(req, [], error))
            self._forget(req)
        self.num_prompt_tokens += sum(n for r, n in out.scheduled if r.num_computed_tokens < r.num_prompt_tokens)
        if self.speculator is not None:
            for req, _ in out.scheduled:
                if req.spec_token_ids and req.request_id in results:
                    self.speculator.observe(req, len(results[req.request_id]))
        self.scheduler.update_from_output(out, {rid: [r.token_id for r in res] for rid, res in results.items()})
        for req, _ in out.scheduled:
            res = results.get(req.request_id)
            if res is None or req.status is not RequestStatus.RUNNING:
                continue
            if req.num_output_tokens == len(res):  # its first tokens: the prompt is done
                self.num_prompt_tokens_seen += req.num_prompt_tokens
            new_ids, status = self.output_processor.emit(req, res)
            self.num_generation_tokens += len(new_ids)
            if status is not None:
                self.scheduler.finish_request(req, status)
            outputs.append(self.output_processor.make_output(req, new_ids))
            if status is not None:
                self._forget(req)
        if kv is not None and any(o.finished for o in outputs):
            kv.wait_for_save()  # a request reported done has its blocks in the store (P/D relies on it)
        if self.budget is not None:
            self.budget.observe(out.num_tokens, time.perf_counter() - start)
        notify(self.step_observers, outputs)
        return outputs

    def _forget(self, req: Request) -> None:
        if self.speculator is not None:
            self.speculator.release(req)
        self.requests.pop(req.request_id, None)
        self.output_processor.forget(req.request_id)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers now (else they stop when the engine is collected or the
        process exits); a no-op for a single-process engine."""
        self.runner.shutdown()
        if self.kv_connector is not None:
            self.kv_connector.close()

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine can run no more steps (a tensor-parallel worker
        has died); cheap enough to call whenever the engine is idle."""
        self.runner.check_health()

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
        if self.speculator is not None:
            self.speculator.check_integrity()

    def snapshot(self, detail: bool = False) -> dict:
        """The per-step view (see `Scheduler.snapshot`); `detail` adds the block grid, the live
        requests and the last batch, for dashboards and recordings."""
        snap = self.scheduler.snapshot(detail)
        if self.kv_connector is not None:
            snap.update(self.kv_connector.snapshot())
        snap.update(num_prompt_tokens=self.num_prompt_tokens, num_prompt_tokens_seen=self.num_prompt_tokens_seen,
                    num_generation_tokens=self.num_generation_tokens,
                    last_step_tokens=self.last_step_tokens)
        if self.speculator is not None:
            snap["spec_decode"] = self.speculator.snapshot()
        return snap
