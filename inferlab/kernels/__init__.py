"""Native CPU kernels: C compiled with the system compiler at first use, cached, loaded through
ctypes, and one dispatcher that picks each entry point's best implementation for this CPU.

Layout (see `inferlab.h`): `portable/*.c` is plain C, compiled once per ISA so the compiler
vectorizes it for each; `<isa>/*.c` are an ISA's own kernels, which replace the portable file of
the same name in that ISA's build. `builder.py` compiles every file with its own ISA's flags, never
-march=native, so one library holds every ISA's entry points (`linear_generic`, `linear_avx2`, ...)
on any x86 machine, and this module lets the CPU's features decide at run time which ones run
(`Kernels`).
`INFERLAB_ISA=generic|avx2|avxvnni|avx512f|avx512vnni|avx512|amx` forces one; `INFERLAB_NATIVE=0`
(or false, off, no) turns the kernels off; `INFERLAB_X16_PRODUCTS=bf16|fp32` picks the AVX-512
regrouped kernel's products (`x16_products`; `avx512f` and `avx512vnni`, for AVX-512 CPUs without
bf16 instructions, have only fp32).

Bindings are read from the headers: the constants from `inferlab.h`, the prototypes from `api.h`,
so ctypes signatures cannot drift from the C ones. If the build fails (no compiler) the engine logs
one line and runs the PyTorch reference path, which stays the definition the kernels are tested
against. The build (a few seconds, one compiler per core) is cached under `$INFERLAB_CACHE`
(default `~/.cache/inferlab`; see `inferlab.cache_dir`), keyed by the sources and flags;
`python -m inferlab.kernels` builds it ahead of time.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess

import torch

from inferlab.kernels.builder import ISAS, ROOT, build, first_error  # noqa: F401 (ROOT: the package's)
from inferlab.kernels.header import (  # noqa: F401 (the package's names)
    DTYPE_CODES,
    WEIGHT_CODES,
    C,
    _ctype,
    check_args,
    prototypes,
    tape_ops,
)
from inferlab.switches import env_switch

log = logging.getLogger("inferlab")


def cpu_flags() -> set[str]:
    """This CPU's features, named as Linux's /proc/cpuinfo names them (`cpu_id`)."""
    return set(cpu_id()[1])


def cpu_vendor() -> str:
    return cpu_id()[0]


@functools.cache
def cpu_id() -> tuple[str, frozenset[str]]:
    """This CPU's vendor and features, read from the CPU by the library's CPUID probe (`cpu_features`
    in api.h): the features whose registers the OS saves, under any OS or container. Where the
    library is not built (no compiler, or INFERLAB_NATIVE=0) no kernel runs, and /proc/cpuinfo's
    serve the messages that name them."""
    loaded = library()
    return _probe(loaded[0]) if loaded else _proc_cpuinfo()


def _probe(lib: ctypes.CDLL) -> tuple[str, frozenset[str]]:
    out = ctypes.create_string_buffer(1024)
    probe = lib.cpu_features_generic
    probe.argtypes, probe.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int], ctypes.c_int
    if probe(ctypes.addressof(out), len(out), 1) < 0:
        raise RuntimeError("the CPU's features did not fit cpu_features' buffer")
    vendor, _, features = out.value.decode("ascii").partition("\n")
    return vendor, frozenset(features.split())


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "", frozenset()
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:40])}
    return field.get("vendor_id", ""), frozenset(field.get("flags", "").split())


# The regrouped blocks' AVX-512 kernel multiplies with bf16 pairs (vdpbf16ps) or fp32 FMAs of the same
# exact weights (api.h, x16_products). Intel's AVX-512 cores issue a vdpbf16ps every 2 cycles and two
# FMAs a cycle, so FMAs do twice the products there; AMD's Zen 4/5 issue both at one rate, so pairs.
X16_PRODUCTS = {"bf16": 0, "fp32": 1}


def x16_products(vendor: str | None = None) -> str:
    """The products this process's regrouped kernel takes: INFERLAB_X16_PRODUCTS, else by the CPU's
    vendor (this CPU's where not given)."""
    raw = os.environ.get("INFERLAB_X16_PRODUCTS", "")
    forced = raw.strip().lower()  # as INFERLAB_ISA is read: " FP32" is fp32
    if forced:
        if forced not in X16_PRODUCTS:
            raise ValueError(f"INFERLAB_X16_PRODUCTS={raw}: one of {', '.join(X16_PRODUCTS)}")
        return forced
    return "fp32" if (cpu_vendor() if vendor is None else vendor) == "GenuineIntel" else "bf16"


def runnable_isas(built: list[str], flags: set[str] | None = None) -> list[str]:
    """The ISAs among `built` that this CPU runs, lowest first."""
    flags = cpu_flags() if flags is None else flags
    return [isa for isa in built if set(ISAS[isa][1]) <= flags]


class Kernels:
    """The library bound for one ISA: for every entry point in api.h, the implementation of the
    highest ISA up to `isa` that has one (`generic` has all). Call an entry point by name with
    tensors, ints and floats (None for a NULL pointer); `num_threads` is filled in."""

    def __init__(self, lib: ctypes.CDLL, isa: str) -> None:
        self.lib, self.isa = lib, isa
        runs = runnable_isas(list(ISAS))  # a lower ISA this CPU lacks (AVX-VNNI below avx512f) is never called
        chain = [c for c in list(ISAS)[:list(ISAS).index(isa) + 1][::-1] if c == isa or c in runs]
        self.functions: dict[str, ctypes._CFuncPtr] = {}
        self.chosen: dict[str, str] = {}  # entry point -> the ISA whose implementation runs
        for name, (ret, params) in prototypes().items():
            for candidate in chain:
                fn = getattr(lib, f"{name}_{candidate}", None)
                if fn is not None:
                    fn.argtypes = [_ctype(t) for t, _ in params]
                    fn.restype = ctypes.c_int if ret == "int" else None
                    self.functions[name], self.chosen[name] = fn, candidate
                    break
            else:
                raise AttributeError(f"the kernel library has no {name}_generic")

    def __getattr__(self, name: str):
        fn = self.__dict__.get("functions", {}).get(name)
        if fn is None:
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def call(self, name: str, *args):
        """Run entry point `name`; a nonzero status is an error (2: out of memory)."""
        check_args(name, args)
        status = self.functions[name](*[_arg(a) for a in args], torch.get_num_threads())
        if status:
            if status == 2:
                raise MemoryError(f"{name}: out of memory for its buffers")
            raise RuntimeError(f"{name} failed (status {status})")
        return status

    def products(self, mode: str | None = None) -> str | None:
        """The regrouped kernel's products ("bf16" or "fp32"; None where this build has no such kernel),
        after setting them to `mode` where given: process-wide, as the start-up choice (`x16_products`)."""
        now = self.functions["x16_products"](-1 if mode is None else X16_PRODUCTS[mode], 1)
        return {v: k for k, v in X16_PRODUCTS.items()}.get(now)

    def address(self, name: str) -> int:
        """The chosen implementation's address, for a tape to call it from C."""
        return ctypes.cast(self.functions[name], ctypes.c_void_p).value


def _arg(a):
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a


def native_wanted() -> bool:
    """INFERLAB_NATIVE: 0, false, off or no turn the kernels off (any other word was taken as on)."""
    return env_switch("INFERLAB_NATIVE")


BUILD_FAILURE: list[BaseException] = []  # why library() found no library, for tests to say (a log, not a setting)


@functools.cache
def library() -> tuple[ctypes.CDLL, list[str]] | None:
    """The loaded library and the ISAs this CPU runs from it, or None where it cannot be built
    (the reason is logged once) or INFERLAB_NATIVE=0."""
    if not native_wanted():
        log.info("native CPU kernels turned off (INFERLAB_NATIVE=%s): using the PyTorch path",
                 os.environ["INFERLAB_NATIVE"])
        if os.environ.get("INFERLAB_ISA", "").strip():
            log.warning("INFERLAB_ISA=%s does nothing while INFERLAB_NATIVE turns the kernels off",
                        os.environ["INFERLAB_ISA"])
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s", first_error(e))
        BUILD_FAILURE.append(e)
        return None
    built = [isa for isa in ISAS if any(hasattr(lib, f"{name}_{isa}") for name in prototypes())]
    # a cached file that is not this build's (damaged, or put there): every entry point has a generic one
    lacks = next((f"{n}_generic" for n in ["cpu_features", *prototypes()] if not hasattr(lib, f"{n}_generic")), None)
    if lacks is not None:
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s is not an InferLab kernel "
                    "library of this version, it lacks %s (delete it to build it again)", lib._name, lacks)
        return None
    vendor, flags = _probe(lib)  # not cpu_id(), which asks this function for the library
    runnable = runnable_isas(built, flags)
    if "avx512" in runnable:  # chosen once, before any call
        lib.x16_products_avx512(X16_PRODUCTS[x16_products(vendor)], 1)
    return lib, runnable


@functools.cache
def for_isa(isa: str) -> Kernels:
    """The kernels bound for `isa` (tests compare each ISA this CPU runs against generic)."""
    loaded = library()
    if loaded is None:
        raise RuntimeError("the native kernels are unavailable")
    lib, runnable = loaded
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}: one of {', '.join(ISAS)}")
    if isa not in runnable:
        missing = sorted(set(ISAS[isa][1]) - cpu_flags())
        raise ValueError(f"this CPU cannot run the {isa} kernels" + (f" (it lacks {', '.join(missing)})" if missing
                                                                      else " (the compiler that built the kernels "
                                                                      "could not build them: a newer gcc or clang "
                                                                      "can, set as CC)"))
    return Kernels(lib, isa)


@functools.cache
def native() -> Kernels | None:
    """The process's kernels: the best ISA this CPU runs, or INFERLAB_ISA's; None when unavailable."""
    loaded = library()
    if loaded is None:
        return None
    forced = os.environ.get("INFERLAB_ISA")
    try:
        kernels = for_isa((forced or "").strip().lower() or loaded[1][-1])  # " AVX2" as INFERLAB_NATIVE reads its
    except ValueError as e:  # name the setting, or the error reads as the model file's
        raise ValueError(f"INFERLAB_ISA={forced}: {e}") from None
    log.debug("native CPU kernels: %s", kernels.isa)
    return kernels


def for_tensor(x: torch.Tensor) -> Kernels | None:
    """The kernels for ops on x (CPU, fp32 or bf16), else None: the caller uses its PyTorch reference.
    While a tape records (`inferlab.tape`), its recorder stands in."""
    if not x.is_cpu or x.dtype not in DTYPE_CODES:  # is_cpu: no device object built per call
        return None
    return _recorder or native()


_recorder = None  # set only while `DecodeTape.record` runs the forward pass it records


def set_recorder(recorder) -> None:
    global _recorder
    _recorder = recorder


def attention_refusal(num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """Why the attention kernels cannot take these heads (None: they can)."""
    if head_dim > C["IL_MAX_HEAD_DIM"]:
        return f"head_dim {head_dim} is over the kernels' {C['IL_MAX_HEAD_DIM']}"
    if num_heads % num_kv_heads:
        return f"{num_heads} query heads are no whole groups of {num_kv_heads} KV heads"
    if num_heads // num_kv_heads > C["IL_MAX_GROUP"]:
        return f"{num_heads // num_kv_heads} query heads a KV head are over the kernels' {C['IL_MAX_GROUP']}"
    if num_heads > C["IL_MAX_HEADS"]:
        return f"{num_heads} query heads are over the kernels' {C['IL_MAX_HEADS']}"
    return None


def attention_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return attention_refusal(num_heads, num_kv_heads, head_dim) is None
