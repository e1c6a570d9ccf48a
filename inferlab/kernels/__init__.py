"""Native CPU kernels: compiled from C with the system compiler at first use, cached, loaded
through ctypes. If anything fails (no compiler, an unsupported CPU) the engine logs one line and
keeps the pure-PyTorch path, which stays the reference the kernels are tested against.

The build takes about 3 s (one compiler per core) and is cached under `$INFERLAB_CACHE` (default
`~/.cache/inferlab`), keyed by the source, the flags and the CPU, so later starts just load it.
`INFERLAB_NATIVE=0` turns the kernels off; `python -m inferlab.kernels` builds them ahead of time.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("inferlab")
SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# Compile with -ffast-math (vectorized expf and reductions) but link without it: linking with it
# would pull in crtfastmath, which flushes denormals to zero for the whole process on load.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-mprefer-vector-width=512", "-fPIC", "-std=c11"]
LINK = ["-shared", "-fopenmp", "-lm", "-lmvec"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_key() -> str:
    """The CPU's feature flags, so a cache shared across machines never runs -march=native code
    built for another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build() -> Path:
    digest = hashlib.sha256(" ".join(FLAGS + LINK).encode() + _cpu_key().encode())
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    key = digest.hexdigest()[:16]
    cache = Path(os.environ.get("INFERLAB_CACHE", Path.home() / ".cache" / "inferlab")) / "kernels"
    lib = cache / f"inferlab_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: safe if two start at once
        objs = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one compiler per core
            list(pool.map(lambda so: subprocess.run([cc, *FLAGS, "-c", str(so[0]), "-o", str(so[1])], check=True,
                                                    capture_output=True, text=True), zip(SOURCES, objs)))
        out = Path(tmp) / lib.name
        subprocess.run([cc, *map(str, objs), "-o", str(out), *LINK], check=True, capture_output=True, text=True)
        os.replace(out, lib)
    return lib


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built (the reason is logged once)."""
    if os.environ.get("INFERLAB_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        _declare(lib)
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:  # AttributeError: a missing symbol
        lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        # the compiler's first error says more than its last line
        detail = next((line for line in lines if "error" in line), lines[-1] if lines else "")
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s", detail.strip())
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures, so ctypes converts Python ints and floats right."""
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.paged_attention.argtypes = [p, p, p, p, i64, p, p, p, i32, p, i32, i32, i32, i32, i32, f32, i32, i32]
    lib.paged_attention.restype = i32
    lib.rms_norm.argtypes = [p, p, p, p, i64, i32, f32, i32, i32]
    lib.silu_and_mul.argtypes = [p, p, i64, i32, i32, i32]
    lib.rope.argtypes = [p, i64, p, p, i64, i32, i32, i32, i32]
    lib.write_kv.argtypes = [p, p, p, p, i64, p, i64, i32, i32, i32]
    lib.argmax_bf16.argtypes = [p, p, i64, i64, i32]
    lib.prefill_attention.argtypes = [p, i64, p, p, p, p, p, p, p, i32, p, i32, i32, i32, i32, i32, f32, i32]
    lib.prefill_attention.restype = i32
    lib.linear_bf16.argtypes = [p, p, p, i32, i32, i32, i32]
    lib.linear_bf16.restype = i32
    lib.decode_layers.argtypes = [p, p, p, i32, p, p, p, p, p, p, p, i32, i32, i32, i32, i32, i32, i32, i32, f32, f32,
                                  i32]
    lib.decode_layers.restype = i32
    for fn in (lib.rms_norm, lib.silu_and_mul, lib.rope, lib.write_kv, lib.argmax_bf16):
        fn.restype = None


def paged_attention_native(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           out: torch.Tensor, rows: torch.Tensor, seqs: torch.Tensor, lens: torch.Tensor,
                           block_tables: torch.Tensor, scale: float) -> None:
    """Attention for `rows` of q ([T, heads, d], written into out, [T, heads, d] contiguous) against
    paged K/V. q may be a view with a row stride (into the fused qkv output); its heads must be dense.
    rows: int64 row ids; seqs: int32 index into block_tables ([S, W] int32); lens: int32 keys seen."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    for t in (out, k_cache, v_cache):
        if not t.is_contiguous() or t.dtype != q.dtype:
            raise ValueError("paged_attention_native needs contiguous tensors of one dtype")
    if q.stride()[1:] != (head_dim, 1):
        raise ValueError("paged_attention_native needs q's heads dense in memory")
    status = lib.paged_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), rows.data_ptr(),
        seqs.data_ptr(),
        lens.data_ptr(), rows.numel(), block_tables.data_ptr(), block_tables.shape[1], num_heads, num_kv_heads,
        head_dim, block_size, scale, DTYPE_CODES[q.dtype], torch.get_num_threads())
    if status:
        raise RuntimeError(f"paged_attention kernel failed (status {status})")


def prefill_attention_native(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             out: torch.Tensor, row0: torch.Tensor, count: torch.Tensor, ctx: torch.Tensor,
                             seq: torch.Tensor, block_tables: torch.Tensor, scale: float) -> bool:
    """Causal attention of prefill chunks on AMX tiles (`prefill_attention.c`). Chunk c's queries
    are rows row0[c] .. row0[c] + count[c] - 1 of q (int64 row0; int32 count, ctx, seq), the last
    of its ctx[c] keys, already in the pool; its block table is block_tables[seq[c]]. Returns False
    where this CPU or shape has no tile path (the caller then uses SDPA)."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.dtype != torch.bfloat16 or q.stride()[1:] != (head_dim, 1) or not out.is_contiguous():
        return False
    status = lib.prefill_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), row0.data_ptr(),
        count.data_ptr(), ctx.data_ptr(), seq.data_ptr(), row0.numel(), block_tables.data_ptr(),
        block_tables.shape[1], num_heads, num_kv_heads, head_dim, block_size, scale, torch.get_num_threads())
    if status == 2:
        raise MemoryError("prefill_attention: out of memory for its scratch buffers")
    return status == 0


def prefill_tiles_supported(lib: ctypes.CDLL, num_heads: int, num_kv_heads: int, head_dim: int,
                            block_size: int) -> bool:
    """Whether this build, CPU and shape run prefill chunks on AMX tiles (bf16): the kernel itself
    answers, given an empty batch."""
    return lib.prefill_attention(None, 0, None, None, None, None, None, None, None, 0, None, 0, num_heads, num_kv_heads,
                                 head_dim, block_size, 1.0, 1) == 0


def supports(dtype: torch.dtype, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return (device.type == "cpu" and dtype in DTYPE_CODES and head_dim <= 256
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 16)
