"""The C allocator's settings for a server worker.

Every request allocates a few large, short-lived buffers (simdjson's parse buffers, the float64
matrix, onnxruntime's outputs). glibc serves large blocks with ``mmap`` and gives them back on
``free``, but after each such ``free`` it raises its threshold (up to 32 MiB), so that later
blocks of that size come from the heap arenas, where they fragment and stay: measured in the
soak, a worker grew 620 -> 700 MB in 90 s of load. Fixing the threshold at 1 MiB (which also
turns the adjustment off) keeps large buffers on ``mmap``: the same soak held 340 -> 390 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks from this size on are mapped, and unmapped when freed
MMAP_THRESHOLD_BYTES = 1 << 20


def bound_large_allocations(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (returns whether it was set: not on other C libraries)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl, macOS: no mallopt, and no such behaviour to fix
        return False
    if ok:
        log.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return ok
