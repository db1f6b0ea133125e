"""keep_freed_memory: memory freed by one step is reused by the next without page faults (glibc only)."""

import json
import platform
import subprocess
import sys

import pytest

from tether.config import resolve_config

# Like a micro-batch's activations: 16 blocks of 4 MiB, all touched, then all freed; count the minor page
# faults of five such rounds. The control pins glibc's mmap threshold at its initial 128 KiB, so every block
# is a fresh mmap and every round faults its 16k pages back in (glibc's dynamic default does that or not
# depending on the heap's layout, too unsteady for a test).
PROBE = """
import ctypes, json, resource, sys
import torch
from tether.train.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    applied = keep_freed_memory()
else:
    applied = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10))  # M_MMAP_THRESHOLD

def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(1 << 20, dtype=torch.float32).fill_(1.0) for _ in range(16)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(5):  # the heap and torch's thread pool settle: not counted
    faults_of_one_round()
print(json.dumps({"applied": applied, "faults": [faults_of_one_round() for _ in range(5)]}))
"""


def _run_probe(script: str, *args: str) -> dict:
    """Run a probe script in a fresh interpreter (malloc settings are process-wide); its last line is JSON."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    control, kept = _run_probe(PROBE, "control"), _run_probe(PROBE, "keep")
    assert control["applied"] is True and kept["applied"] is True
    assert min(control["faults"]) > 8192  # most of each round's 16384 pages fault in again
    assert max(kept["faults"]) < 100  # the freed blocks are reused as they are


def test_keep_freed_memory_is_a_config_key_on_by_default():
    assert resolve_config({}).keep_freed_memory is True
    assert resolve_config({}, overrides=["keep_freed_memory=false"]).keep_freed_memory is False


RELEASE_PROBE = """
import json
import torch
from tether.train.host_memory import keep_freed_memory, release_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

keep_freed_memory()
blocks = [torch.empty(1 << 20, dtype=torch.float32).fill_(1.0) for _ in range(32)]  # 128 MiB on the heap
peak = rss_mib()
del blocks
kept = rss_mib()
released = release_freed_memory()
print(json.dumps({"peak": peak, "kept": kept, "after": rss_mib(), "released": released}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's; RSS is read from /proc")
def test_release_freed_memory_hands_kept_memory_back():
    """What keep_freed_memory keeps after a free, release_freed_memory gives back (the trainer does it once,
    after the first step)."""
    r = _run_probe(RELEASE_PROBE)
    assert r["peak"] - r["kept"] < 16  # freed, but kept by malloc
    assert r["released"] is True and r["kept"] - r["after"] > 100  # most of the 128 MiB returned
