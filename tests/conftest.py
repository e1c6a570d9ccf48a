"""Shared fixtures: the embedded model is loaded once per session and shared read-only by engines."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import shutil
import warnings

import pytest
import torch

from inferlab import LLM
from inferlab.model.loader import load_model

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "hi",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 7?",
    "Explain in two sentences why the sky is blue, then say which colour sunsets are and why they differ.",
    "Tell me a short story about a robot who learns to paint. Use about five sentences, give the robot "
    "a name, and end with a line of dialogue from the robot about what painting means to it.",
]


def pytest_configure(config):
    """Models the tests parse (dozens of GGUF files in pytest's temporary folders) are cached in a
    folder of this run's own, not the user's ~/.cache/inferlab (it grew by hundreds of MiB a run);
    the kernels stay the user's, built once. A cache the user named is kept as it is."""
    import os
    import tempfile

    from inferlab.cache_dir import cache_dir
    if os.environ.get("INFERLAB_CACHE"):
        return
    kernels = cache_dir("kernels")
    kernels.mkdir(parents=True, exist_ok=True)
    run = tempfile.mkdtemp(prefix="inferlab-test-cache-")
    os.symlink(kernels, os.path.join(run, "kernels"))
    os.environ["INFERLAB_CACHE"] = run
    config.add_cleanup(lambda: shutil.rmtree(run, ignore_errors=True))


def pytest_sessionstart(session):
    """A kernel source that does not compile stops the run with the compiler's error: skipped, every
    kernel test read as if this CPU lacked the ISA, and the engine tests ran the PyTorch path."""
    import subprocess

    from inferlab import kernels
    if kernels.native_wanted() and kernels.library() is None and kernels.BUILD_FAILURE and \
            isinstance(kernels.BUILD_FAILURE[-1], subprocess.CalledProcessError):  # a compiler, and an error
        raise pytest.UsageError(f"the native kernels failed to build: {kernels.first_error(kernels.BUILD_FAILURE[-1])}"
                                " (INFERLAB_NATIVE=0 runs the tests without them)")


def pytest_generate_tests(metafunc):
    """A test taking `isa` runs once per kernel ISA, skipped with the reason where this CPU lacks it."""
    if "isa" in metafunc.fixturenames:
        from inferlab import kernels
        loaded = kernels.library()
        failed = kernels.BUILD_FAILURE[-1] if kernels.BUILD_FAILURE else None
        runnable = loaded[1] if loaded else []
        flags = kernels.cpu_flags()

        def why(isa: str) -> str:
            if loaded is None:
                return f"the native kernels are unavailable: {kernels.first_error(failed) if failed else 'turned off'}"
            missing = sorted(set(kernels.ISAS[isa][1]) - flags)
            lacks = f"it lacks {', '.join(missing)}" if missing else "this compiler did not build them"
            return f"this CPU cannot run the {isa} kernels ({lacks})"
        metafunc.parametrize("isa", [pytest.param(isa, marks=[] if isa in runnable else
                                                  [pytest.mark.skip(reason=why(isa))]) for isa in kernels.ISAS])


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in fp32."""
    return load_model(None, "float32", torch.device("cpu"))


@pytest.fixture(scope="session")
def chat_prompts(smol):
    """Token ids of CHAT_QUESTIONS with the chat template applied (lengths 34 to ~80)."""
    tok = smol[1]
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in CHAT_QUESTIONS]


@pytest.fixture
def make_llm(smol):
    def make(**kwargs) -> LLM:
        return LLM(loaded=smol, **kwargs)
    return make


@pytest.fixture(scope="session")
def tiny(smol):
    """A tiny random Llama (1 layer, hidden 32) with the embedded tokenizer: steps take
    milliseconds, so scheduling tests can run thousands of them. Greedy output is deterministic."""
    from inferlab.model.llama import LlamaForCausalLM, ModelArgs
    torch.manual_seed(0)
    args = ModelArgs(arch="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                     intermediate_size=64, vocab_size=smol[1].vocab_size, max_position=4096,
                     tie_word_embeddings=True)
    model = LlamaForCausalLM(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, smol[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_tiny_engine(tiny):
    from inferlab.config import EngineConfig
    from inferlab.engine import LLMEngine

    def make(clock=None, **kwargs) -> LLMEngine:
        kwargs.setdefault("num_kv_blocks", 64)
        kwargs.setdefault("block_size", 4)
        return LLMEngine(EngineConfig(**kwargs), clock=clock or FakeClock(), loaded=tiny)
    return make


# The floating-point environment (x86-64 glibc's fenv_t: the x87 control word first, MXCSR last): a
# test that leaves a rounding mode other than to-nearest behind changes every later fp32 result, and
# moved this engine's and HF's log-probabilities alike by up to 5e-3 from float64's in some whole-suite
# runs (round toward zero gives that; which test, or library, sets it is not known yet).
_LIBM = ctypes.CDLL(ctypes.util.find_library("m")) if platform.machine() == "x86_64" else None
DEFAULT_MXCSR = 0x1F80  # exceptions masked, round to nearest, no flush to zero


def _fp_environment() -> tuple[int, int]:
    env = (ctypes.c_uint16 * 16)()
    _LIBM.fegetenv(env)
    return env[0] & 0x0C00, (env[14] | env[15] << 16) & 0xFFFF  # x87 rounding bits, MXCSR


@pytest.fixture(autouse=True)
def default_fp_environment(request):
    """After each test, the rounding mode to nearest again, and a warning naming the test that left
    another (its name is what finds the code that sets it)."""
    yield
    if _LIBM is None:
        return
    x87, mxcsr = _fp_environment()
    if x87 or mxcsr & 0xE040 != DEFAULT_MXCSR & 0xE040:  # rounding, flush-to-zero and denormals-are-zero bits
        warnings.warn(f"{request.node.nodeid} left the floating-point environment changed (x87 rounding "
                      f"{x87:#x}, MXCSR {mxcsr:#x}): reset to the default", stacklevel=1)
        _LIBM.fesetenv(ctypes.c_void_p(-1))  # FE_DFL_ENV
