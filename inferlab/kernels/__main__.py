"""`python -m inferlab.kernels`: build the native kernels now and say which ISA runs here."""
import argparse
import logging

from inferlab import kernels

argparse.ArgumentParser(prog="python -m inferlab.kernels", description=__doc__).parse_args()  # --help; no others
logging.basicConfig(level=logging.INFO, format="%(message)s")
try:
    k = kernels.native()
except ValueError as e:  # a bad INFERLAB_ISA: its one line
    raise SystemExit(f"error: {e}") from None
if k is None:
    raise SystemExit("native kernels unavailable (the line above says why)")
lib, runnable = kernels.library()
print(f"native kernels built ({lib._name}); this CPU runs {', '.join(runnable)}; using {k.isa}")
