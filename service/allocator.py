"""The C allocator's settings for a server worker.

Every request allocates a few large, short-lived buffers: the request's matrix, onnxruntime's
outputs (1024 cells x 765 genes of float32 is 3 MB), the top-k ranking's temporaries, the
answer's bytes. glibc's defaults serve blocks from 128 KiB up with ``mmap`` and unmap them on
``free``, and then raise that threshold (up to 32 MiB) so that later blocks of the size come from
the heap arenas. Both ends cost something:

* on ``mmap``, every buffer is fresh from the kernel: each of its 4 KiB pages faults and is
  zeroed on first touch, ~30% of a worker's CPU at 1024 cells per request (system time);
* on the heap, buffers are reused without faults, but the arenas keep their high-water mark:
  freed memory stays resident (a REST soak worker grew 620 -> 700 MB in 90 s).

So a worker fixes the threshold at :data:`MMAP_THRESHOLD_BYTES` (64 MiB: a batch's arrays and
the JSON parser's tape for bodies up to ~8 MB are reused from the heap; larger blocks are mapped;
fixing it also stops glibc's adjustment) and a thread gives the arenas' free pages back every
``trim_every_s`` (``malloc_trim``), which bounds how long the heap holds a peak. Measured on 2
cores, 1024 cells per request (docs/benchmarks.md section 3), server CPU per 1000 cells: typed
gRPC 52 -> 43 ms, OIP REST 45 -> 38 ms (16 MiB); typed REST 100 -> 89 ms (64 MiB against 16: the
parser's buffers, ~75 MB reserved for a 7.6 MB body, no longer fault). 90 s REST soak memory
growth: +45 MB before (1 MiB, no trimming), +15 / +43 (16 MiB), +62 / +28 (64 MiB), +70 to +87
untrimmed; the bound is +64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
#: blocks from this size on are mapped, and unmapped when freed; smaller ones are reused
MMAP_THRESHOLD_BYTES = 64 << 20

_trimmer: threading.Thread | None = None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both; musl and macOS do not)
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> bool:
    """Give the heap arenas' free pages back to the operating system now (``malloc_trim(0)``);
    whether any memory was released (``False`` on other C libraries)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def tune(threshold: int = MMAP_THRESHOLD_BYTES, trim_every_s: float = 1.0) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes and, if ``trim_every_s > 0``, start
    one daemon thread per process that trims the heap that often. Returns whether the threshold
    was set (``False`` on other C libraries, which have neither behaviour)."""
    global _trimmer
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, threshold):
        return False
    log.debug("glibc mmap threshold fixed at %d bytes", threshold)
    if trim_every_s > 0 and _trimmer is None:

        def run() -> None:
            while True:
                time.sleep(trim_every_s)
                libc.malloc_trim(0)  # ctypes releases the GIL during the call

        _trimmer = threading.Thread(target=run, name="malloc-trim", daemon=True)
        _trimmer.start()
    return True
