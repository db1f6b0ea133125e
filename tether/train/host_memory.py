"""Keep freed host memory in the process, so that the next step reuses it without page faults.

Every RL step allocates and frees the same large tensors (activations of each micro-batch, bf16 gradients,
their float32 copies). glibc's malloc serves blocks above its mmap threshold (dynamic, from 128 KiB) with
fresh `mmap`s and gives freed memory at the top of the heap back to the OS (trim threshold), so each step
page-faults those bytes in again and the kernel zeroes every page: on a 47M-parameter model that was about
a tenth of a CPU step (benchmarks/README.md). Raising both thresholds makes malloc keep and reuse the
memory instead. Peak RSS is unchanged (it was touched at the peak anyway), but RSS no longer drops after it.

The setting is process-wide and stays for the life of the process; it does nothing on other C libraries.
The first step is the exception: what it frees is mostly one-off (torch.compile's tracing and code
generation, loading), so `release_freed_memory` hands the free memory back once after it, and later steps
grow RSS only to what they need.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit; larger values are refused.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: in effect, never trim


def _glibc_function(name: str, argtypes: list, restype=ctypes.c_int):
    """A function of glibc's malloc by name, typed; None on other systems and C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; True if glibc accepted both (False elsewhere)."""
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Return free heap memory to the OS now (glibc's malloc_trim); True if anything was released."""
    malloc_trim = _glibc_function("malloc_trim", [ctypes.c_size_t])
    return malloc_trim is not None and bool(malloc_trim(0))
