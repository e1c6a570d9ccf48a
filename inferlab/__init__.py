"""InferLab: a small, readable LLM inference engine (paged KV cache, prefix caching, continuous batching)."""
import os
import sys

# Idle OpenMP threads spin up to ~3M iterations (a few ms) before sleeping: long enough to bridge
# the Python between a step's parallel regions (the default, 300k, is not: the cpu workload ran at
# 364 tok/s against 408), short enough that an idle server does not keep a core busy. With the count
# given, OMP_WAIT_POLICY=ACTIVE changes one thing only: how long they spin once the process holds
# more OpenMP threads than cores, 1,000 iterations instead of 100. Each thread that starts parallel
# work keeps its own pool, so a model loaded on one thread and run on another is such a case: a
# token took 34-52 ms there, 9.5-25 ms with it (8-11 on one thread; `AsyncEngine` avoids the case).
# OpenMP reads both once, when PyTorch loads, hence here; a user's setting of either is kept, as
# the count would override their policy. See inferlab/threads.py for the busy-machine case.
if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
    os.environ.update(GOMP_SPINCOUNT="3000000", OMP_WAIT_POLICY="ACTIVE")

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("inferlab")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+source"

from inferlab.config import EngineConfig  # noqa: E402
from inferlab.engine import LLMEngine  # noqa: E402
from inferlab.llm import LLM  # noqa: E402
from inferlab.logger import setup_logging  # noqa: E402
from inferlab.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from inferlab.sampling_params import SamplingParams  # noqa: E402

setup_logging()

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
