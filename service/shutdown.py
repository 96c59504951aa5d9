"""A worker's way out after SIGTERM, bounded so that it fits the pod's budget.

Kubernetes gives a pod ``terminationGracePeriodSeconds`` from the start of its preStop hook to
its end. In a worker, on SIGTERM:

1. gRPC starts draining at once (health turns ``NOT_SERVING``, new calls are refused, calls in
   flight get ``CELLEXPLAIN_SHUTDOWN_GRACE_S``), side by side with HTTP, whose server (uvicorn)
   stops accepting and lets requests in flight finish: ``bentoml serve
   --timeout-graceful-shutdown`` (set to the same grace by ``make serve`` and the deployment)
   cancels what is still running after it;
2. a watchdog ends the worker if it is still alive ``grace + margin`` seconds after SIGTERM
   (a never-ending upload under a ``bentoml serve`` started without that flag, a stuck thread).

So a worker is gone within ``CELLEXPLAIN_SHUTDOWN_GRACE_S + EXIT_MARGIN_S`` of SIGTERM, whatever
its clients do. docs/deploy.md adds up the budget.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: after the grace, how long the normal exit path (model close, process teardown) may take
EXIT_MARGIN_S = 5.0


class ShutdownDeadline:
    """Chains a SIGTERM handler in front of the server's own (uvicorn's): calls ``on_term``
    once, and arms the watchdog."""

    def __init__(
        self, grace_s: float, on_term: Callable[[], None], margin_s: float = EXIT_MARGIN_S
    ) -> None:
        self.grace_s = grace_s
        self.margin_s = margin_s
        self.on_term = on_term
        self.fired_at: float | None = None

    def install(self) -> bool:
        """Install the handler (main thread only; returns whether it was installed)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("shutdown deadline not installed: not on the main thread")
            return False
        previous = signal.getsignal(signal.SIGTERM)

        def handler(sig: int, frame: FrameType | None) -> None:
            self.fire()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + sig)

        signal.signal(signal.SIGTERM, handler)
        return True

    def fire(self) -> None:
        if self.fired_at is not None:
            return
        self.fired_at = time.monotonic()
        log.info(
            "SIGTERM: draining HTTP and gRPC for up to %.0f s (CELLEXPLAIN_SHUTDOWN_GRACE_S)",
            self.grace_s,
        )
        threading.Thread(target=self._drain, name="shutdown-drain", daemon=True).start()
        threading.Thread(target=self._watchdog, name="shutdown-watchdog", daemon=True).start()

    def _drain(self) -> None:
        try:
            self.on_term()
        except Exception:
            log.exception("draining after SIGTERM failed")

    def _watchdog(self) -> None:
        time.sleep(self.grace_s + self.margin_s)
        log.warning(
            "still running %.0f s after SIGTERM (grace %.0f s + %.0f s): exiting now",
            self.grace_s + self.margin_s,
            self.grace_s,
            self.margin_s,
        )
        _exit(0)


def _exit(code: int, *_: Any) -> None:
    logging.shutdown()
    os._exit(code)
