"""The worker's allocator tuning (:mod:`cellexplain.service.allocator`), measured in a fresh
Python process (its heap is the thing measured)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


_HEAP_PROBE = """
import json, sys
import numpy as np, psutil
from cellexplain.service import allocator
applied = allocator.tune(trim_every_s=0)
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
blocks, pins = [], []
for _ in range(40):  # 120 MB of batch-sized buffers, each followed by a small long-lived one
    blocks.append(np.ones(3 << 20, np.uint8))
    pins.append(np.ones(4096, np.uint8))
del blocks
freed = rss()
released = allocator.trim()
print(json.dumps({"applied": applied, "before": before, "freed": freed, "trimmed": rss(),
                  "released": released}))
"""


def test_the_worker_allocator_reuses_batch_buffers_and_gives_them_back():
    """A worker keeps batch-sized buffers on the heap (no page faults per request: they stay
    resident once freed) and the trim gives that memory back to the system."""
    import json
    import platform
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    if platform.libc_ver()[0] != "glibc":
        assert r == {**r, "applied": False, "released": False}
        return
    assert r["applied"]
    assert r["freed"] - r["before"] > 100, r  # freed, yet resident: reused by the next request
    assert r["released"] and r["freed"] - r["trimmed"] > 100, r  # trimmed: back to the system
