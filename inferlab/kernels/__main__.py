"""`python -m inferlab.kernels`: build the native kernels now (set-up does this), print where they are."""
import sys

from inferlab.kernels import native_library

lib = native_library()
if lib is None:
    sys.exit("native kernels unavailable (see the message above); the engine will use the PyTorch path")
print(lib._name)
