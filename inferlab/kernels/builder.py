"""Building the kernel library: every ISA's C files compiled with that ISA's own flags (never
-march=native) into one shared library, cached by the hash of its sources and flags. The dispatch
that picks what runs on this CPU is the package's (`inferlab.kernels`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from inferlab.cache_dir import cache_dir

log = logging.getLogger("inferlab")
ROOT = Path(__file__).parent
# Compile with -ffast-math (vectorized expf and reductions) but link without it: linking with it
# would pull in crtfastmath, which flushes denormals to zero for the whole process on load.
CFLAGS = ["-O3", "-fopenmp", "-ffast-math", "-fPIC", "-std=c11", "-Wall", "-Wno-unused-function"]
# A name no file defines is a link error, not a library that fails to load (or is cached) with it dangling
LINK = ["-shared", "-fopenmp", "-lm", *(["-Wl,--no-undefined"] if platform.system() == "Linux" else [])]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512F = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
_AVX512 = [*_AVX512F, "-mavx512bf16", "-mavx512vnni"]
_AVX512F_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq")
# name: (compiler flags, the CPU features it needs, as generic/cpu.c reads them by CPUID and names them
# after /proc/cpuinfo), lowest first. An ISA's functions may call any lower ISA's by name: its build
# links after theirs.
ISAS = {
    "generic": ([], ()),
    "avx2": (_AVX2, ("avx2", "fma", "f16c")),
    # AVX2 with AVX-VNNI (Intel client cores since Alder Lake): only the int8 block products change
    "avxvnni": ([*_AVX2, "-mavxvnni"], ("avx2", "fma", "f16c", "avx_vnni")),
    # AVX-512 without AVX512-BF16 (Skylake-SP to Ice Lake-SP): only the regrouped blocks' fp32 products
    "avx512f": (_AVX512F, _AVX512F_FLAGS),
    # and with AVX512-VNNI (Cascade Lake, Ice Lake-SP): only the int8 path's block products change
    "avx512vnni": ([*_AVX512F, "-mavx512vnni"], (*_AVX512F_FLAGS, "avx512_vnni")),
    "avx512": (_AVX512, (*_AVX512F_FLAGS, "avx512_bf16", "avx512_vnni")),
    "amx": ([*_AVX512, "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
            (*_AVX512F_FLAGS, "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")),
}
PORTABLE_ISAS = ("generic", "avx2", "avx512")  # the AMX build adds only its own kernels
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


def sources(isa: str) -> list[Path]:
    own = sorted((ROOT / isa).glob("*.c"))
    portable = [p for p in sorted((ROOT / "portable").glob("*.c")) if not (ROOT / isa / p.name).exists()]
    return own + (portable if isa in PORTABLE_ISAS else [])


def compiled_isas() -> list[str]:
    return list(ISAS) if X86 else ["generic"]


COMPILE_TIMEOUT = 900  # seconds for one file (the largest takes ~30 s): past it, a compiler is thrashing
COMPILER_BYTES = 450 << 20  # what one compiler takes at most (avx512*/x16.c)


def _compile(cc: list[str], src: Path, obj: Path, isa: str) -> None:
    try:
        subprocess.run([*cc, *CFLAGS, *ISAS[isa][0], f"-DIL_ISA={isa}", f"-I{obj.parent}", "-c", str(src), "-o",
                        str(obj)], check=True, capture_output=True, text=True,  # -I: the headers written into the build
                       timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise OSError(f"compiling {src.name} for {isa} took over {COMPILE_TIMEOUT} s (short of memory, "
                      "swapping?)") from None


def _takes_flags(cc: list[str], isa: str, tmp: str) -> bool:
    """Whether the compiler takes `isa`'s flags at all (an empty file): if it does, a file of that ISA that
    fails to build has an error of its own, which is the source's to fix, not a compiler too old."""
    empty = Path(tmp) / "empty.c"
    empty.write_text("int il_empty;\n")
    done = subprocess.run([*cc, *CFLAGS, *ISAS[isa][0], "-c", str(empty), "-o", str(empty.with_suffix(".o"))],
                          capture_output=True, text=True)
    return done.returncode == 0


def _compiler() -> list[str]:
    """CC as make reads it: "ccache gcc", "gcc -g"."""
    try:
        return shlex.split(os.environ.get("CC") or "cc") or ["cc"]
    except ValueError as e:
        raise OSError(f"CC={os.environ['CC']!r} cannot be read as a command: {e}") from None


def _damaged(lib: Path) -> str | None:
    """Why a cached library cannot be a whole shared object, or None. A file cut short (a crash
    before its bytes reached the disk) killed every start with SIGBUS when loaded."""
    with open(lib, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"\x7fELF"):
        return None if platform.system() != "Linux" else "not an ELF file"
    if len(head) < 64 or head[4] != 2 or head[5] != 1:  # (64-bit little-endian: what it was built as here)
        return "cut short" if len(head) < 64 else None
    shoff, shentsize, shnum = int.from_bytes(head[40:48], "little"), *struct.unpack("<HH", head[58:62])
    return "cut short" if lib.stat().st_size < shoff + shentsize * shnum else None


def _cached(lib: Path) -> bool:
    if not lib.exists():
        return False
    why = _damaged(lib)
    if why is not None:
        log.warning("the cached kernel library %s is %s: building it again", lib, why)
        with contextlib.suppress(OSError):
            lib.unlink()
        return False
    return True


@contextlib.contextmanager
def _one_build_at_a_time(cache: Path):
    """Two processes starting at once (tensor-parallel ranks, say) build once: the second waits, then
    finds the library. Without the lock both built it, with twice the compilers' memory."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: two builds side by side are still safe, only slower
        yield
        return
    with open(cache / "build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build() -> Path:
    """The library's path, built now if not cached. An ISA whose flags this compiler does not take
    (too old for AMX, say) is left out with a warning; any other error fails the build."""
    cc = _compiler()
    isas = compiled_isas()
    digest = hashlib.sha256(" ".join([*cc, *CFLAGS, *LINK, *isas, repr(ISAS)]).encode())
    for src in sorted(ROOT.rglob("*.[ch]")):
        digest.update(str(src.relative_to(ROOT)).encode() + src.read_bytes())
    from inferlab.kernels.header import tape_calls  # (it reads ROOT from here)
    calls = tape_calls()  # generated, so a change to its generator is a new library too
    digest.update(calls.encode())
    cache = cache_dir("kernels")
    lib = cache / f"inferlab_kernels-{digest.hexdigest()[:16]}.so"
    if not _cached(lib):
        cache.mkdir(parents=True, exist_ok=True)
        with _one_build_at_a_time(cache):
            if not _cached(lib):  # (another process may have built it while this one waited)
                _build(cc, isas, calls, lib)
    _keep_and_prune(cache, lib)
    return lib


def _build(cc: list[str], isas: list[str], calls: str, lib: Path) -> None:
    from inferlab import cgroup
    if shutil.which(cc[0]) is None:  # (a library built ahead is used without one)
        where = "is not there" if os.sep in cc[0] else "is not on PATH"
        raise OSError(f"no C compiler: {cc[0]!r} {where} (install gcc or clang, or set CC to one)")
    memory = cgroup.memory_limit()
    if memory and memory[1] < COMPILER_BYTES:  # a compiler then thrashed for minutes, or was killed
        raise OSError(f"this container's memory limit leaves {memory[1] >> 20} MiB free, and building the "
                      f"kernels takes up to {COMPILER_BYTES >> 20} MiB beside this process: raise the limit for "
                      "the first start, or build them ahead where there is room (`python -m inferlab.kernels`, "
                      "with the same INFERLAB_CACHE)")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build aside, then rename: safe if two start at once
        (Path(tmp) / "tape_calls.h").write_text(calls)  # the tape's calls, from api.h
        jobs = [(src, Path(tmp) / f"{isa}-{src.parent.name}-{src.stem}.o", isa) for isa in isas for src in sources(isa)]
        workers = compilers()
        log.info("building the native kernels (%d files for %s, %d at a time), once after an install or an "
                 "update: a minute or two on 2 cores", len(jobs), ", ".join(isas), workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = dict(zip([j[2] for j in jobs], [None] * len(jobs)))
            for (_, _, isa), fut in zip(jobs, [pool.submit(_compile, cc, *job) for job in jobs]):
                try:
                    fut.result()
                except subprocess.CalledProcessError as e:
                    if e.returncode < 0 or "Killed signal" in (e.stderr or ""):  # killed: the rest would be too
                        pool.shutdown(cancel_futures=True)
                        raise
                    errors[isa] = errors[isa] or e
                except OSError:
                    pool.shutdown(cancel_futures=True)
                    raise
        if errors["generic"]:
            raise errors["generic"]
        for isa in isas:
            if errors[isa] and _takes_flags(cc, isa, tmp):
                raise errors[isa]  # the source's error (a definition that does not match api.h, say): no library
        built = [isa for isa in isas if not errors.get(isa)]
        for isa in set(isas) - set(built):
            log.warning("native kernels for %s left out: this compiler cannot build them (%s)", isa,
                        first_error(errors[isa]))
        out = Path(tmp) / lib.name
        objs = [str(obj) for _, obj, isa in jobs if isa in built]
        subprocess.run([*cc, *objs, "-o", str(out), *LINK], check=True, capture_output=True, text=True)
        with open(out, "rb+") as f:  # on the disk before its name is: a crash must not leave a cut-short library
            os.fsync(f.fileno())
        os.replace(out, lib)


def compilers() -> int:
    """How many compilers run at once: one per CPU this process may use (its affinity and a
    container's CPU quota, not the host's cores), and no more than one per 512 MiB a container's memory
    limit leaves free. One compiler takes up to 0.45 GB (avx512*/x16.c): two at once under a 768 MiB
    limit had the OOM killer end them, then the engine."""
    from inferlab import cgroup
    from inferlab.threads import usable_cpus
    cpus, memory = usable_cpus(), cgroup.memory_limit()
    return max(1, min(cpus, memory[1] >> 29)) if memory else cpus


UNUSED_DAYS = 30  # a library no start has loaded for this long is another version's: each update leaves one


def _keep_and_prune(cache: Path, lib: Path) -> None:
    """Mark `lib` as used (its mtime, at most daily) and delete libraries unused for UNUSED_DAYS.
    Another install sharing the cache keeps its library by loading it; one idle for a month
    rebuilds it. A process that has one loaded keeps it: unlinking a mapped file is safe."""
    now = time.time()
    for stale in cache.glob("tmp*"):  # a build killed midway (no handler ran): aside for an hour, it is no one's
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale)
    for path in cache.glob("inferlab_kernels-*.so"):
        with contextlib.suppress(OSError):  # a read-only cache keeps everything; another start may prune too
            if path == lib and now - path.stat().st_mtime > 86400:
                os.utime(path)
            elif path != lib and now - path.stat().st_mtime > UNUSED_DAYS * 86400:
                path.unlink()
                log.info("deleted %s, a kernel library no start has used for %d days", path, UNUSED_DAYS)


def first_error(e: BaseException) -> str:
    """The compiler's first error line (`file:line:col: error: ...`), or the message's last line."""
    if isinstance(e, subprocess.CalledProcessError) and not (e.stderr or "").strip():  # (CC=false says nothing)
        return f"{e.cmd[0]} failed with exit status {e.returncode} and printed nothing"
    lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
    line = next((line for line in lines if "error:" in line or "error" in line.split("/")[-1]),
                lines[-1] if lines else "").strip()
    if "Killed signal" in line:  # gcc's words when the kernel ends its cc1
        line += " (most likely out of memory: a compiler takes up to 0.45 GB, once, to build the kernels)"
    return line
