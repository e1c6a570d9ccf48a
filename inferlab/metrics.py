"""Prometheus metrics in text format, with vLLM's metric names under an `inferlab:` prefix.

Gauges and counters are read from the engine's per-step snapshot; latency histograms are fed by
the engine thread from each step's outputs. Nothing here reaches into engine internals.
"""
from __future__ import annotations

import bisect
from collections import Counter

from inferlab.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        """Text-format lines, each series with `labels` (`name="value",...`) beside its own."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{self.name}_bucket{{le="{le}",{labels}}} {cumulative}')
        lines += [f"{self.name}_sum{{{labels}}} {self.sum}", f"{self.name}_count{{{labels}}} {self.count}"]
        return lines


def label_value(text: str) -> str:
    """`text` as a quoted label value's inside (Prometheus escapes these three)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class EngineMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram("inferlab:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = Histogram("inferlab:inter_token_latency_seconds", "Time between two output tokens.",
                             LATENCY_BUCKETS)
        self.e2e = Histogram("inferlab:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = Histogram("inferlab:request_queue_time_seconds", "Arrival to first scheduled.",
                               LATENCY_BUCKETS)
        self.iteration_tokens = Histogram("inferlab:iteration_tokens_total", "Tokens per engine step.",
                                          TOKEN_BUCKETS)
        self.finished: Counter[str] = Counter()
        self._last_token: dict[str, float] = {}

    def observe(self, out: RequestOutput, now: float) -> None:
        m, rid = out.metrics, out.request_id
        if out.outputs[0].new_token_ids and m is not None:
            last = self._last_token.get(rid)
            if last is None and m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
            elif last is not None:
                self.itl.observe(now - last)
            self._last_token[rid] = now
        if out.finished:
            self._last_token.pop(rid, None)
            self.finished[out.outputs[0].finish_reason or "abort"] += 1
            if m is not None:
                self.e2e.observe(now - m.arrival_time)
                if m.first_scheduled_time is not None:
                    self.queue.observe(m.first_scheduled_time - m.arrival_time)

    def observe_step(self, num_tokens: int) -> None:
        self.iteration_tokens.observe(num_tokens)

    def render(self, snapshot: dict, model_name: str) -> str:
        """Every series labelled with the served model's name, as vLLM labels its own."""
        kv, model = snapshot["kv"], f'model_name="{label_value(model_name)}"'
        lines: list[str] = []

        def metric(kind: str, name: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{model}}} {value}"])

        metric("gauge", "inferlab:num_requests_running", "Requests in the running batch.", snapshot["num_running"])
        metric("gauge", "inferlab:num_requests_waiting", "Requests waiting (incl. preempted).",
               snapshot["num_waiting"])
        metric("gauge", "inferlab:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", kv["usage"])
        metric("counter", "inferlab:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
               kv["prefix_queries"])
        metric("counter", "inferlab:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
               kv["prefix_hits"])
        transfer = snapshot.get("kv_transfer")
        if transfer is not None:  # a KV connector: what came from and went to the shared store
            metric("gauge", "inferlab:num_requests_loading_kv", "Requests waiting for KV from the store.",
                   snapshot["num_loading"])
            metric("counter", "inferlab:kv_transfer_hit_tokens_total", "Prompt tokens loaded from the KV store.",
                   transfer["hit_tokens"])
            metric("counter", "inferlab:kv_transfer_saved_blocks_total", "KV blocks saved to the store.",
                   transfer["saved_blocks"])
            metric("counter", "inferlab:kv_transfer_errors_total", "Failed KV store calls (each a miss, "
                   "computed locally).", transfer["store_errors"])
        metric("counter", "inferlab:num_preemptions_total", "Preemptions (recompute or swap).",
               snapshot["num_preemptions"])
        metric("counter", "inferlab:prompt_tokens_total", "Prompt tokens of requests that reached their first "
               "token, cached ones included (vLLM's).", snapshot["num_prompt_tokens_seen"])
        metric("counter", "inferlab:prompt_tokens_computed_total", "Prompt tokens computed: prefix-cache hits and "
               "loaded KV excluded, recomputation after preemption included.", snapshot["num_prompt_tokens"])
        metric("counter", "inferlab:generation_tokens_total", "Tokens generated.", snapshot["num_generation_tokens"])
        spec = snapshot.get("spec_decode")
        if spec is not None:  # vLLM's speculative decoding counters
            metric("counter", "inferlab:spec_decode_num_drafts_total", "Verified drafts (one per request and step).",
                   spec["num_drafts"])
            metric("counter", "inferlab:spec_decode_num_draft_tokens_total", "Draft tokens proposed and verified.",
                   spec["num_draft_tokens"])
            metric("counter", "inferlab:spec_decode_num_accepted_tokens_total", "Draft tokens accepted.",
                   spec["num_accepted_tokens"])
            name = "inferlab:spec_decode_num_accepted_tokens_per_pos_total"
            lines += [f"# HELP {name} Draft tokens accepted, by position in the draft.", f"# TYPE {name} counter"]
            lines += [f'{name}{{position="{i}",{model}}} {n}' for i, n in enumerate(spec["accepted_per_pos"])]
        lines += ["# HELP inferlab:request_success_total Finished requests by finish reason.",
                  "# TYPE inferlab:request_success_total counter"]
        for reason in sorted({"stop", "length", "abort", "error", *self.finished}):
            n = self.finished[reason]
            lines.append(f'inferlab:request_success_total{{finished_reason="{reason}",{model}}} {n}')
        for h in (self.ttft, self.itl, self.e2e, self.queue, self.iteration_tokens):
            lines += h.render(model)
        return "\n".join(lines) + "\n"
