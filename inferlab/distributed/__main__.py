"""`python -m inferlab.distributed --rank R ...`: one worker rank, as the driver starts them."""
import sys

from inferlab.distributed.worker import main

sys.exit(main())
