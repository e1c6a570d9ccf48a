"""The KV pool's size and memory: the bytes a block takes, how many blocks a configuration gets,
the pool tensor's shape, and the zero-filled memory that holds it."""
from __future__ import annotations

import logging
import math
import mmap
import os

import torch

from inferlab import cgroup
from inferlab.config import EngineConfig
from inferlab.model.base import ModelArgs

log = logging.getLogger("inferlab")


def kv_bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """One block's bytes in one rank's pool (tensor parallelism splits the pool by KV heads)."""
    return args.num_layers * block_size * args.kv_bytes_per_token(dtype) // tp_size


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def container_memory() -> int | None:
    """A container's memory limit where it is below the machine's memory (`cgroup.py`), else None."""
    limit = cgroup.memory_limit()
    return limit[0] if limit and limit[0] < _machine_memory() else None


def physical_memory() -> int:
    """The machine's memory, or a container's memory limit where lower: a pool sized from the host's
    in a 1.5 GiB container had the OOM killer end `bench` at start, without a word."""
    return container_memory() or _machine_memory()


def default_kv_cache_memory(device: torch.device, ranks_here: int = 1) -> int:
    """80% of free GPU memory (the weights are loaded already), or 20% of RAM up to 4 GiB shared by
    the host's ranks: each holds its share of the KV heads, so the pool holds as many tokens as one
    rank's would (not `ranks_here` times as many, each touched at start)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    return min(4 << 30, physical_memory() // 5) // ranks_here


def kv_pool_blocks(config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(blocks, bytes a block) of one rank's pool: `num_kv_blocks`, else `kv_cache_memory` bytes or
    the device's default share."""
    per_block = kv_bytes_per_block(args, config.block_size, dtype, config.tensor_parallel_size)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    else:
        budget = config.kv_cache_memory or default_kv_cache_memory(device, config.tensor_parallel_size // config.nnodes)
        if budget < per_block:
            raise ValueError(f"kv_cache_memory {budget} bytes is less than one block ({per_block} bytes)")
        blocks = budget // per_block
    # a pool past the RAM could never be used, and its bookkeeping alone could take it (1e15 bytes)
    if device.type == "cpu" and blocks * per_block > (ram := physical_memory()):
        raise ValueError(f"a KV pool of {blocks * per_block / 2**30:,.1f} GiB is more than the {ram / 2**30:.1f} "
                         "GiB of memory this process may use; lower kv_cache_memory / num_kv_blocks")
    return blocks, per_block


def host_swap_blocks(config: EngineConfig, num_blocks: int, per_block: int, device: torch.device) -> int:
    """Blocks of the host pool that swap preemption fills (`swap_space` GiB). With the KV pool it
    must fit in the memory this process may use: under a 768 MiB container limit the default 4 GiB
    filled as requests were swapped out, and the OOM killer ended the process without a word."""
    blocks = int(config.swap_space * 2**30) // per_block
    if config.preemption_mode == "swap" and device.type == "cpu" and \
            (num_blocks + blocks) * per_block > 0.9 * (ram := physical_memory()):
        pool = num_blocks * per_block / 2**30
        raise ValueError(f"swap_space {config.swap_space:g} GiB with the KV pool's {pool:.2f} GiB is more than the "
                         f"{ram / 2**30:.1f} GiB of memory this process may use; lower swap_space")
    return blocks


def available_memory() -> int:
    """Bytes Linux could give without swapping (MemAvailable), at most what a container's memory
    limit leaves free; elsewhere, the physical memory."""
    limit = cgroup.memory_limit()
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        free = physical_memory()
    return min(free, limit[1]) if limit else free


def allocate_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    prefault: bool = False) -> torch.Tensor:
    """A zero-filled pool. Masked-out slots still enter attention as 0 * value, so they must
    hold finite numbers. On CPU, anonymous mmap gives zero pages that the OS faults in only as
    blocks are first used, so a large pool costs nothing at start (torch.zeros would touch
    every page: seconds for a few GiB). Blocks lie anywhere in it, so attention would miss the TLB
    at almost every block with 4 KiB pages: the pool asks for transparent huge pages (2 MiB) where
    Linux offers them (measured, 64 decodes x 300 keys, one core: attention 210 -> 192 ms a step,
    the whole step 744 -> 689 ms). The mapping is private: a shared one is shmem, which Linux backs
    with huge pages only where shmem_enabled says so, by default never (so on the AVX2 VM the pool had
    none: attention_speed.py 2.57 -> 2.44 ms a layer once private). `prefault` writes the zeros now
    (both threads faulting pages in), so first uses cost nothing: on a KVM guest a fresh 2 MiB page
    took 2.6 ms (0.74 GiB/s), and the `cpu` workload ran 3-10% faster with it (955-988 -> 982-1,060 tok/s,
    alternating)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    size = max(1, numel * torch.empty(0, dtype=dtype).element_size())
    # a clear error now, not the OOM killer; the rest of the run (activations, the sampler) needs some too:
    # a 700 MiB pool in a 1 GiB container that left 723 MiB free passed without it, and was killed
    available = available_memory()
    headroom = min(512 << 20, available // 4)
    if size > available - headroom and prefault:
        raise ValueError(f"the KV pool of {size / 2**30:.2f} GiB cannot be taken at start: {available / 2**30:.2f} "
                         f"GiB is available and the rest of the run needs {headroom / 2**30:.2f} GiB of it; lower "
                         "kv_cache_memory / num_kv_blocks, or leave kv_cache_prefault off")
    if size > available - headroom:  # taken as used: no refusal, but no silent end either
        log.warning("the KV pool of %.2f GiB is more than the %.2f GiB free (less %.2f GiB for the rest of the run): "
                    "filled, it would run out of memory (in a container, the OOM killer ends the process without a "
                    "word); lower kv_cache_memory / num_kv_blocks", size / 2**30, available / 2**30, headroom / 2**30)
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # the kernel's overcommit rules refuse it
        raise ValueError(f"the KV pool of {size / 2**30:.1f} GiB cannot be mapped ({e.strerror}); lower "
                         "kv_cache_memory / num_kv_blocks") from None
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    pool = torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)
    if prefault:
        torch.frombuffer(buf, dtype=torch.uint8).zero_()
    return pool


def pool_shape(args, num_blocks: int, block_size: int, tp_size: int = 1) -> tuple[int, ...]:
    """(tensors, layers, blocks, block_size, heads, head_dim): K and V, or MLA's one latent; a
    tensor-parallel rank holds its share of the KV heads."""
    parts, blocks, _, pool_heads, width = args.kv_cache_shape(num_blocks, block_size)
    return parts, args.num_layers, blocks, block_size, pool_heads // tp_size, width
