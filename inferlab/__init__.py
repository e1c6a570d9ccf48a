"""InferLab: a small, readable LLM inference engine (paged KV cache, prefix caching, continuous batching)."""
import os
import sys

# Idle OpenMP threads spin up to ~3M iterations (a few ms) before sleeping: long enough to bridge
# the Python between a step's parallel regions (the default, 300k, is not: the cpu workload ran at
# 364 tok/s against 408), short enough that an idle server does not keep a core busy. OpenMP reads
# it once, when PyTorch loads, hence here. See inferlab/threads.py for the busy-machine case.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000000")

from inferlab.config import EngineConfig  # noqa: E402
from inferlab.engine import LLMEngine  # noqa: E402
from inferlab.llm import LLM  # noqa: E402
from inferlab.logger import setup_logging  # noqa: E402
from inferlab.outputs import CompletionOutput, RequestOutput  # noqa: E402
from inferlab.sampling_params import SamplingParams  # noqa: E402

setup_logging()

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
