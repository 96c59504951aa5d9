"""How many of the server's worker processes are alive, told by each worker.

BentoML's arbiter starts ``n_workers`` processes and, inside a container
(``BENTOML_CONTAINERIZED``, set by every Bento image), does not start a new one when one dies:
a pod that lost a worker to the OOM killer or a segfault kept serving at part capacity with
green probes. Each worker counts its live siblings (children of the same arbiter running
BentoML's worker module) from ``/proc``; ``/livez`` and ``/readyz`` fail while one is missing
(the kubelet restarts the container), gRPC health says NOT_SERVING (within 5 s), and
``cellexplain_workers_live`` / ``cellexplain_workers_expected`` tell Prometheus.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cellexplain.service import metrics

log = logging.getLogger(__name__)

#: the module BentoML runs each service worker as (``python -m _bentoml_impl.worker.service``)
WORKER_MODULE = b"_bentoml_impl.worker.service"
#: seconds between two updates of the live-worker gauge
REFRESH_S = 5.0


def live_workers(parent: int | None = None, proc: Path = Path("/proc")) -> int | None:
    """Live (not zombie) processes whose parent is ``parent`` (default: this process's) and
    that run BentoML's worker module; ``None`` where ``/proc`` cannot tell (not Linux)."""
    parent = os.getppid() if parent is None else parent
    try:
        entries = list(proc.iterdir())
    except OSError:
        return None
    n = 0
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
            if int(ppid) != parent or state == b"Z":
                continue
            if WORKER_MODULE in (entry / "cmdline").read_bytes():
                n += 1
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return n


class WorkerWatch:
    """This worker's view of its siblings: :meth:`all_alive` for the HTTP probes, and a thread
    that keeps the gauges current (the most recent report of any live worker wins) and tells
    ``on_change`` (gRPC health) when the answer changes."""

    def __init__(self, expected: int, on_change: Callable[[bool], None] | None = None) -> None:
        self.expected = expected
        self.on_change = on_change
        self._last: bool | None = True  # every worker starts SERVING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self) -> int | None:
        n = live_workers()
        if n is not None:
            metrics.WORKERS_LIVE.set(n)
            metrics.WORKERS_EXPECTED.set(self.expected)
        return n

    def all_alive(self) -> bool:
        """Whether as many workers run as were started (true where ``/proc`` cannot tell, and
        outside a BentoML server, where this process has no worker siblings)."""
        n = self.count()
        alive = n is None or n == 0 or n >= self.expected
        if alive != self._last and self.on_change is not None:
            self._last = alive
            self.on_change(alive)
        return alive

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(REFRESH_S):
                try:
                    self.all_alive()
                except Exception:  # a report lost: the next one comes in 5 s
                    log.exception("counting the workers failed")

        self.all_alive()
        self._thread = threading.Thread(target=run, name="cellexplain-workers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
