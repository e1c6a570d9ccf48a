"""HostKVPool: the host side of preemption by swap — KV blocks in host memory, and the copies
between them and the runner's pool that a step's scheduler output lists (`swap_out`, `swap_in`).

It sees the runner's pool only through `ModelRunner.read_blocks` / `write_blocks` (blocks along
dim 0, each in whatever shape the pool keeps one), so it does not depend on the pool's layout.
On CPU a swap is a memory copy; on a GPU it is a copy over PCIe into pinned memory.
"""
from __future__ import annotations

import torch

from inferlab.runner import ModelRunner


class HostKVPool:
    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner = runner
        self.num_blocks = num_blocks
        self.pool: torch.Tensor | None = None  # (num_blocks, *one block's K/V), allocated by the first swap

    def copy(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Swap-outs first: a device block one of them frees may be the target of a swap-in."""
        if swap_out:
            device, host = zip(*swap_out)
            blocks = self.runner.read_blocks(list(device))
            if self.pool is None:
                self.pool = torch.empty((self.num_blocks, *blocks.shape[1:]), dtype=blocks.dtype,
                                        pin_memory=self.runner.device.type == "cuda")
            self.pool[list(host)] = blocks
        if swap_in:
            device, host = zip(*swap_in)
            self.runner.write_blocks(list(device), self.pool[list(host)])
