"""Large host buffers kept for reuse instead of handed back to the kernel after every step (glibc malloc, Linux).

At tiny model sizes on the CPU, every step allocates several [tokens x 201,088] fp32 buffers (~400 MB each: logits,
log-probabilities, their gradients). glibc serves blocks above its mmap threshold with fresh mappings and unmaps
them when freed, so each step faults every page of them in again and the kernel zeroes them: on a 2-core machine
more time went to that than to the matmuls (demo teacher step 1.46 -> 0.81 s, offline-KD step 2.84 -> 1.31 s).
Raising the mmap and trim thresholds to their maximum keeps freed blocks in the heap for the next step.
The cost: the process's resident memory stays at its peak instead of shrinking between steps. Used by the commands
that run models (train, eval, teacher score, demo) and by the test suite; not by `vpmoe upcycle`, whose streamed
conversions report their peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int: blocks above 2 GiB are still mapped and unmapped


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): the default allocator stays as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, _LARGEST))
