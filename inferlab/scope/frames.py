"""Frames: what the dashboard draws and a recording stores, one per engine step.

A frame is the engine's detailed snapshot (`LLMEngine.snapshot(detail=True)`: block grid, live
requests, last batch, counters) plus the time, the per-step batch records since the previous
frame (so a viewer that gets only a few frames a second still sees every step), and cumulative
TTFT / inter-token latency histograms. A trace file is a header line, then one frame a line.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from inferlab.metrics import LATENCY_BUCKETS, EngineMetrics
from inferlab.outputs import RequestOutput

if TYPE_CHECKING:  # replay needs no model code, so `inferlab scope` starts without torch
    from inferlab.engine import LLMEngine

TRACE_VERSION = 1
HISTORY_STEPS = 600  # step records a (re)connecting viewer gets, enough to fill the timeline


# The settings a viewer shows: how the engine schedules, never a path, a host, or a KV connector's URL
# (which holds a Redis password): /scope/info is open whatever --api-key says, and traces are shared
SHOWN_SETTINGS = ("dtype", "block_size", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                  "prefix_cache", "kv_allocation", "preemption_mode", "scheduling_policy", "sjf_aging_rate")


def shown(config: dict) -> dict:
    """The SHOWN_SETTINGS of a config (an older trace's header held them all), a policy file by its name."""
    if not isinstance(config, dict):  # a trace file edited by hand, say
        return {}
    out = {name: config[name] for name in SHOWN_SETTINGS if name in config}
    if isinstance(out.get("scheduling_policy"), str):  # path/to/mine.py:Class -> mine.py:Class
        out["scheduling_policy"] = os.path.basename(out["scheduling_policy"])
    return out


def header(engine: LLMEngine, mode: str) -> dict:
    """What a viewer needs before the first frame: the engine's scheduling settings and the pool size."""
    config = shown(vars(engine.config))
    return {"type": "header", "version": TRACE_VERSION, "mode": mode, "config": config,
            "num_blocks": engine.block_manager.num_blocks, "block_size": engine.config.block_size,
            "latency_buckets": list(LATENCY_BUCKETS)}


def encode(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


class FrameBuilder:
    """Collects one small record per step and builds full frames on demand. Runs on the thread
    that steps the engine. `metrics` are read for the latency histograms; without them the builder
    keeps its own, fed from each step's outputs."""

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self.feeds_metrics = metrics is None
        self.metrics = metrics or EngineMetrics()
        self.start = time.monotonic()
        self.pending: list[list] = []  # step records since the last frame
        self.history: deque[list] = deque(maxlen=HISTORY_STEPS)

    def now(self) -> float:
        return round(time.monotonic() - self.start, 4)

    def on_step(self, outputs: list[RequestOutput]) -> None:
        if self.feeds_metrics:
            now = time.monotonic()
            for out in outputs:
                self.metrics.observe(out, now)
        b = self.engine.scheduler.batch_view()
        record = [self.engine.scheduler.step_count, self.now(), b["prefill"], b["decode"], b["budget"],
                  b["preempted"]]
        self.pending.append(record)
        self.history.append(record)

    def frame(self, with_history: bool = False) -> dict:
        """A full frame; `with_history` sends the recent step records instead of the new ones, so
        a viewer that just (re)connected resumes with a filled timeline (the new ones stay pending
        for the next frame of everyone else: a viewer skips records it has seen)."""
        frame = {"type": "frame", "t": self.now(), **self.engine.snapshot(detail=True),
                 "steps": list(self.history) if with_history else self.pending,
                 "latency": {"ttft": self.metrics.ttft.counts, "itl": self.metrics.itl.counts}}
        if not with_history:
            self.pending = []
        return frame
