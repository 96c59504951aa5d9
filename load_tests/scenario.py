"""The load-test scenario shared by the Locust (REST) and gRPC drivers: the request mix, the bad
requests and their expected answers, and the SLOs a run must meet.

Real cells: scanpy's bundled PBMCs (log1p CP10k of 765 genes), tiled to the request sizes.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np

#: cells per request -> relative weight in the mix (small requests dominate, as from pipelines
#: that annotate as they go; big ones are batch jobs)
SIZES: dict[int, int] = {1: 6, 64: 3, 1024: 1}
#: share of requests that are deliberately bad (each must get its 4xx, never a 5xx)
BAD_SHARE = 0.1


@dataclass(frozen=True)
class Slo:
    """What a run must meet; each field can be overridden by a LOAD_* environment variable."""

    #: p99 latency bound per request size (ms); generous for a 2-core CI machine under load
    p99_ms: dict[int, float] = field(default_factory=lambda: {1: 1500.0, 64: 3000.0, 1024: 15000.0})
    #: valid requests that may fail (0: none)
    max_error_rate: float = 0.0
    #: growth of the workers' resident memory over the soak (MB): the median of the samples in
    #: the last third of the run minus that of the first third after the warm-up (single
    #: samples swing by the requests in flight: a 1024-cell JSON body parses to ~25 MB)
    max_memory_growth_mb: float = 64.0
    #: seconds before memory is first sampled (models, caches and pools settle)
    warmup_s: float = 10.0

    @classmethod
    def from_env(cls) -> Slo:
        slo = cls()
        p99 = dict(slo.p99_ms)
        for n in p99:
            if f"LOAD_P99_MS_{n}" in os.environ:
                p99[n] = float(os.environ[f"LOAD_P99_MS_{n}"])
        return cls(
            p99_ms=p99,
            max_error_rate=float(os.environ.get("LOAD_MAX_ERROR_RATE", slo.max_error_rate)),
            max_memory_growth_mb=float(
                os.environ.get("LOAD_MAX_MEMORY_GROWTH_MB", slo.max_memory_growth_mb)
            ),
            warmup_s=float(os.environ.get("LOAD_WARMUP_S", slo.warmup_s)),
        )


@dataclass(frozen=True)
class BadRequest:
    """A request the service must refuse: with ``status`` (REST) / ``code`` (gRPC), and an
    error that names ``field``."""

    name: str
    genes: list[str]
    cells: np.ndarray
    status: int
    code: str
    field: str
    model: str | None = None
    ragged: bool = False  # REST only: the last row loses a value


def cells() -> tuple[list[str], np.ndarray]:
    """Genes and log1p CP10k values of real PBMCs, tiled to the largest request size."""
    from cellexplain.models.data import load_default_adata

    raw = load_default_adata().raw
    genes = list(raw.var_names)
    X = np.asarray(raw.X.toarray(), dtype=np.float32)
    reps = math.ceil(max(SIZES) / X.shape[0])
    return genes, np.tile(X, (reps, 1))[: max(SIZES)]


def bad_requests(genes: list[str], X: np.ndarray) -> list[BadRequest]:
    dup = [*genes[:-1], genes[0]]  # the same name twice, for a model gene: a tie, refused
    neg = X[:4].copy()
    neg[1, 7] = -3.0
    nan = X[:4].copy()
    nan[2, 3] = np.nan
    return [
        BadRequest("duplicated genes", dup, X[:4], 400, "INVALID_ARGUMENT", "genes"),
        BadRequest("negative value", genes, neg, 400, "INVALID_ARGUMENT", "cells[1][7]"),
        BadRequest("NaN value", genes, nan, 400, "INVALID_ARGUMENT", "cells[2][3]"),
        BadRequest("unknown model", genes, X[:4], 404, "NOT_FOUND", "model", model="nope"),
        BadRequest("ragged rows", genes, X[:4], 400, "INVALID_ARGUMENT", "cells[3]", ragged=True),
    ]


def rest_body(genes: list[str], X: np.ndarray, **options: object) -> bytes:
    """A /v1/annotate body (``NaN`` written as the JSON5 literal our parser accepts)."""
    import json

    rows = X.tolist()
    if options.pop("ragged", False):
        rows[-1] = rows[-1][:-1]
    body = {"genes": genes, "cells": rows, "input": "log1p_cp10k", "top_k": 10, **options}
    return json.dumps(body, allow_nan=True).encode()


def pick_size() -> int:
    """A request size drawn from the mix."""
    return random.choices(list(SIZES), weights=list(SIZES.values()))[0]


def size_of(name: str) -> int | None:
    m = re.match(r"annotate (\d+) cells?", name)
    return int(m.group(1)) if m else None


def server_rss_mb(url: str) -> float | None:
    """The workers' resident memory from the server's /metrics (None before any inference)."""
    import httpx

    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    m = re.search(r"^cellexplain_worker_resident_memory_bytes(?:\{[^}]*\})? (\S+)$", text, re.M)
    return float(m.group(1)) / 1e6 if m else None


class MemorySampler:
    """Samples the server's worker memory every ``interval_s`` from ``warmup_s`` on, in a
    background thread, until :meth:`stop`."""

    def __init__(self, url: str, warmup_s: float, interval_s: float = 1.0) -> None:
        import threading

        self.url = url
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._warmup_s = warmup_s
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(self._warmup_s):
            return
        while not self._stop.is_set():
            try:
                rss = server_rss_mb(self.url)
            except Exception:  # a missed sample is not a failure of the service
                rss = None
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(self._interval_s)

    def describe(self) -> str:
        """The samples taken, in MB, for a verdict's message."""
        return " ".join(f"{s:.0f}" for s in self.samples)

    def stop(self) -> tuple[float | None, float | None]:
        """(start, end) in MB: medians of the first and last thirds of the samples."""
        self._stop.set()
        self._thread.join(timeout=15)
        k = len(self.samples) // 3
        if k == 0:
            return None, None
        return float(np.median(self.samples[:k])), float(np.median(self.samples[-k:]))


def check_slo(
    slo: Slo,
    p99_ms: dict[int, float],
    valid: int,
    valid_failures: int,
    bad_unexpected: int,
    rss_start_mb: float | None,
    rss_end_mb: float | None,
) -> list[str]:
    """The SLO violations of a run (empty: it passed)."""
    problems = []
    for n, bound in slo.p99_ms.items():
        if n in p99_ms and p99_ms[n] > bound:
            problems.append(f"p99 of {n}-cell requests {p99_ms[n]:.0f} ms > {bound:.0f} ms")
    rate = valid_failures / valid if valid else 1.0
    if not valid:
        problems.append("no valid request completed")
    elif rate > slo.max_error_rate:
        problems.append(
            f"{valid_failures} of {valid} valid requests failed ({rate:.2%} > "
            f"{slo.max_error_rate:.2%})"
        )
    if bad_unexpected:
        problems.append(f"{bad_unexpected} bad requests got an unexpected answer")
    if rss_start_mb is None or rss_end_mb is None:
        problems.append(
            "server memory not sampled (cellexplain_worker_resident_memory_bytes): is the run "
            "longer than three samples after the warm-up?"
        )
    elif rss_end_mb - rss_start_mb > slo.max_memory_growth_mb:
        problems.append(
            f"server memory grew {rss_end_mb - rss_start_mb:.0f} MB after warm-up "
            f"({rss_start_mb:.0f} -> {rss_end_mb:.0f} MB) > {slo.max_memory_growth_mb:.0f} MB"
        )
    return problems
