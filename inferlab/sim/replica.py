"""Replica: one simulated engine — the engine's own Scheduler, policy queue and BlockManager,
stepped on its own virtual clock by the cost model instead of the model. Every output token is
a dummy; a request ends after its trace's output_len tokens (its EOS, finish "stop") or at its
max_tokens, whichever comes first."""
from __future__ import annotations

from inferlab.allocation import OutOfKVMemoryError
from inferlab.budget import StepBudget
from inferlab.config import EngineConfig
from inferlab.policy import make_queue
from inferlab.radix_cache import PREFIX_CACHES
from inferlab.request import Request, RequestStatus
from inferlab.sampling_params import SamplingParams
from inferlab.scheduler import Scheduler
from inferlab.sim.cost_model import CostModel
from inferlab.sim.trace import TraceRequest, prompt_tokens

_PARAMS = SamplingParams(max_tokens=None)
ONE_TOKEN = [0]  # what every simulated step samples (read, never changed)

# A finished request: (trace index, arrival, first scheduled, first token, finish, output tokens)
Record = tuple[int, float, float, float, float, int]


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Replica:
    def __init__(self, config: EngineConfig, num_blocks: int, cost: CostModel) -> None:
        self.clock = VirtualClock()
        self.block_manager = PREFIX_CACHES[config.prefix_cache](num_blocks, config.block_size,
                                                                config.enable_prefix_caching)
        num_host_blocks = int(config.swap_space * 2**30 // (cost.kv_bytes_per_token * config.block_size))
        self.scheduler = Scheduler(config, self.block_manager, make_queue(config.scheduling_policy,
                                   config.sjf_aging_rate), self.clock, num_host_blocks)
        self.cost = cost
        self.swap_block_seconds = cost.swap_seconds(1, config.block_size)
        self.budget = StepBudget(config.step_time_target) if config.max_num_batched_tokens == "auto" else None
        self.done: list[Record] = []
        self.ends: dict[str, int] = {}  # request id -> output tokens after which it finishes
        self.steps = self.output_tokens = self.prefill_tokens = self.swapped_blocks = 0
        self.peak_usage = 0.0

    @property
    def busy(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def load(self) -> int:
        """Requests admitted and not yet finished: what a least-loaded router compares."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def add(self, i: int, t: TraceRequest, max_tokens: int) -> bool:
        """Queue trace request `i`; False if refused (kv_allocation="reserve": out of KV memory)."""
        if not self.busy:
            self.clock.now = max(self.clock.now, t.arrival)  # idle until this arrival
        try:
            self.scheduler.add_request(Request(str(i), prompt_tokens(i, t), _PARAMS, t.arrival,
                                               max_tokens=max_tokens, priority=t.priority))
        except OutOfKVMemoryError:
            return False
        self.ends[str(i)] = min(t.output_len, max_tokens)
        return True

    def step(self) -> None:
        sched, cost = self.scheduler, self.cost
        if self.budget is not None:  # "auto": the budget follows the cost model's step times
            sched.max_num_batched_tokens = self.budget.for_step(len(sched.running))
        out = sched.schedule()
        if not out.scheduled:
            raise RuntimeError("scheduler made no progress")  # cannot happen: a lone request always fits
        # One pass does what StepFeatures.of, the runner and the stop rules would do separately:
        # it runs once per running request per step, millions of times in a long replay.
        prefill = decodes = context = 0
        sampled: dict[str, list[int]] = {}
        finishing, ends = [], self.ends
        for req, n in out.scheduled:
            end = req.num_computed_tokens + n
            context += end
            num_prompt = len(req.prompt_token_ids)
            if n == 1 and end > num_prompt:
                decodes += 1
            else:
                prefill += n
            if end == len(req.token_ids):  # the chunk reaches the last token: one is sampled
                sampled[req.request_id] = ONE_TOKEN
                if end + 1 - num_prompt >= ends[req.request_id]:
                    finishing.append(req)
        swapped = len(out.swap_out) + len(out.swap_in)  # preemption by swap: bytes copied, not FLOPs
        self.swapped_blocks += swapped
        seconds = (cost.base + cost.per_prefill_token * prefill + cost.per_decode_seq * decodes
                   + cost.per_context_token * context + self.swap_block_seconds * swapped)
        self.clock.now += seconds
        if self.budget is not None:
            self.budget.observe(prefill + decodes, seconds)
        self.steps += 1
        self.prefill_tokens += prefill
        usage = self.block_manager.usage
        if usage > self.peak_usage:
            self.peak_usage = usage
        sched.update_from_output(out, sampled)
        now = self.clock.now
        for req in finishing:
            self.output_tokens += req.num_output_tokens
            n = ends.pop(req.request_id)
            sched.finish_request(req, RequestStatus.FINISHED_STOPPED if n < req.max_tokens else
                                 RequestStatus.FINISHED_LENGTH)
            self.done.append((int(req.request_id), req.arrival_time, req.first_scheduled_time,
                              req.first_token_time, now, n))
