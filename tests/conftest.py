"""Test-wide settings."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` in any test

# One thread per test process: tests run two at a time (pytest -n 2) on two cores, and 2-thread torch runs
# slow down 3-10x when another process holds a core (1 thread degrades gently). Subprocesses inherit it.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Keep the tiny models' own progress bars and warnings out of test output.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
