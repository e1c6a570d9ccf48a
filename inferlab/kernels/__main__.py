"""`python -m inferlab.kernels`: build the native kernels now and say which ISA runs here."""
import logging

from inferlab import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
k = kernels.native()
if k is None:
    raise SystemExit("native kernels unavailable (see the warning above)")
print(f"native kernels built; this CPU runs {', '.join(kernels.library()[1])}; using {k.isa}")
