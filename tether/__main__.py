"""`python -m tether ...` (e.g. under `torchrun --nproc_per_node 2 -m tether train ...`)."""

import sys

from tether.cli import main

sys.exit(main())
