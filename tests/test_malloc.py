"""Freed activations stay in the process: reusing them costs no page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from inferlab.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.empty(16 << 20); x.fill_(1); del x  # 64 MiB, like a big prefill step's activations
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.empty(16 << 20); y.fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True,
                              text=True).stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_second_big_allocation_reuses_freed_pages():
    pages = (64 << 20) // 4096
    assert _faults("default") > pages // 2, "glibc's default hands big blocks back (the case this fixes)"
    assert _faults("keep") < pages // 20
