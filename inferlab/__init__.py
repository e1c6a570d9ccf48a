"""InferLab: a small, readable LLM inference engine (paged KV cache, prefix caching, continuous batching)."""
import os
import sys

# Idle OpenMP threads sleep rather than spin (OpenMP reads this once, when PyTorch loads, so it must
# be set before the first `import torch`). With spinning threads, any other busy process on a small
# machine makes every parallel region wait for a descheduled thread: a 2-core VM with one other
# busy process ran a prefill 5x slower with 2 spinning threads than with 2 sleeping ones.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from inferlab.config import EngineConfig  # noqa: E402
from inferlab.engine import LLMEngine  # noqa: E402
from inferlab.llm import LLM  # noqa: E402
from inferlab.logger import setup_logging  # noqa: E402
from inferlab.outputs import CompletionOutput, RequestOutput  # noqa: E402
from inferlab.sampling_params import SamplingParams  # noqa: E402

setup_logging()

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
