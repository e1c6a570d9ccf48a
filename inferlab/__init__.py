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
# Kernels built by clang run on LLVM's OpenMP runtime, beside the GNU one PyTorch's ops use: there
# PyTorch's threads spinning after each op took the cores from the kernels' threads, so those spin
# 1,000 iterations only (on the AMX Xeon's two cores: the `cpu` workload 528 -> 918 tok/s, a 128-token
# prompt's first token 70 -> 36 ms, as a gcc build's 920 and 34-36).
def _kernels_built_by_clang() -> bool:
    """Whether the compiler the kernels are built with (CC, else cc: inferlab/kernels/builder.py) is clang."""
    import shlex
    import shutil
    try:
        words = [w for w in shlex.split(os.environ.get("CC") or "cc") if not w.startswith("-")]
    except ValueError:  # unbalanced quotes: the build says so
        return False
    return any("clang" in os.path.basename(os.path.realpath(shutil.which(w) or w)) for w in words)


if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
    os.environ.update(GOMP_SPINCOUNT="1000" if _kernels_built_by_clang() else "3000000", OMP_WAIT_POLICY="ACTIVE")

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
from inferlab.pooling import (  # noqa: E402
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingParams,
    ScoringRequestOutput,
)
from inferlab.sampling_params import SamplingParams  # noqa: E402
from inferlab.structured import StructuredOutputsParams  # noqa: E402

setup_logging()

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "PoolingParams", "EmbeddingRequestOutput", "ClassificationRequestOutput", "ScoringRequestOutput",
           "StructuredOutputsParams"]
