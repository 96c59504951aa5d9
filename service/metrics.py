"""Prometheus metrics of the annotation core (beside BentoML's own request metrics).

Plain ``prometheus_client`` metrics: BentoML runs its workers in prometheus_client's
multiprocess mode, so ``/metrics`` sums the values of every worker.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any

import numpy as np
import prometheus_client as prom

log = logging.getLogger(__name__)

_FRACTION_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
_CELL_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

CELLS = prom.Counter(
    name="cellexplain_cells_annotated_total",
    documentation="Cells annotated, by model and predicted label (Unassigned included)",
    labelnames=["model", "label"],
)
UNASSIGNED = prom.Counter(
    name="cellexplain_cells_unassigned_total",
    documentation="Cells labelled Unassigned, by reason: low_confidence (below the confidence "
    "threshold), novel (at or above the novelty threshold), low_confidence_and_novel",
    labelnames=["model", "reason"],
)
CONFIDENCE = prom.Histogram(
    name="cellexplain_confidence",
    documentation="Probability of the predicted class, per cell (fine between 0.5 and 1, where "
    "the top class's probability lives)",
    labelnames=["model"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
)
NOVELTY = prom.Histogram(
    name="cellexplain_novelty",
    documentation="Per cell, the share of known-type cells nearer to a known type than it (a "
    "rise at the top buckets: cells of a type the model was not trained on)",
    labelnames=["model"],
    buckets=(0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0),
)
MISSING_GENES = prom.Histogram(
    name="cellexplain_missing_gene_fraction",
    documentation="Fraction of the model's genes absent from a request (drift signal)",
    labelnames=["model"],
    buckets=_FRACTION_BUCKETS,
)
COMPLETENESS_GAP = prom.Histogram(
    name="cellexplain_completeness_gap",
    documentation="Per cell, |sum(attributions) - (F(x) - F(x0))| / |F(x) - F(x0)|: how far the "
    "attributions are from explaining the whole logit change (IG's quadrature error)",
    labelnames=["model"],
    buckets=(1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5, 1.0),
)
INFERENCE_SECONDS = prom.Histogram(
    name="cellexplain_inference_seconds",
    documentation="onnxruntime time per batch (prediction and in-graph attributions together)",
    labelnames=["model"],
    buckets=_SECONDS_BUCKETS,
)
BATCH_CELLS = prom.Histogram(
    name="cellexplain_batch_cells",
    documentation="Cells per onnxruntime call, after merging concurrent requests",
    labelnames=["model"],
    buckets=_CELL_BUCKETS,
)
BATCH_REQUESTS = prom.Histogram(
    name="cellexplain_batch_requests",
    documentation="Request chunks merged into one onnxruntime call",
    labelnames=["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
ATTRIBUTION_SECONDS = prom.Histogram(
    name="cellexplain_attribution_seconds",
    documentation="Time to rank and serialise attributions per request (their computation is "
    "inside the ONNX graph, counted in cellexplain_inference_seconds)",
    labelnames=["model"],
    buckets=_SECONDS_BUCKETS,
)
ERRORS = prom.Counter(
    name="cellexplain_request_errors_total",
    documentation="Rejected requests, by front door and error type",
    labelnames=["door", "type"],
)
GRPC_SECONDS = prom.Histogram(
    name="cellexplain_grpc_request_seconds",
    documentation="gRPC call duration by method and status code (BentoML's own request "
    "metrics cover REST only)",
    labelnames=["method", "code"],
    buckets=(*_SECONDS_BUCKETS, 10, 30, 60),
)
ADMITTED_CELLS = prom.Counter(
    name="cellexplain_admitted_cells_total",
    documentation="Cells admitted into a model's queue (the rest were refused: overloaded), "
    "by model: its rate is the load a worker took on",
    labelnames=["model"],
)
QUEUED_CELLS = prom.Gauge(
    name="cellexplain_queued_cells",
    documentation="Cells waiting for an onnxruntime call, per worker (pid) and model: the "
    "signal to scale on (CPU says little when requests are batched, nothing on a GPU)",
    labelnames=["model"],
    multiprocess_mode="liveall",
)
INFLIGHT_CELLS = prom.Gauge(
    name="cellexplain_inflight_cells",
    documentation="Cells in the onnxruntime call running now, per worker (pid) and model",
    labelnames=["model"],
    multiprocess_mode="liveall",
)
QUEUE_WAIT_SECONDS = prom.Histogram(
    name="cellexplain_queue_wait_seconds",
    documentation="Time a request's chunk waits in the queue before its batch runs",
    labelnames=["model"],
    buckets=(*_SECONDS_BUCKETS, 10, 30, 60),
)
MODEL_INFO = prom.Gauge(
    name="cellexplain_model_info",
    documentation="1 for each model served, with its version and the sha256 of its ONNX graph",
    labelnames=["model", "version", "sha256"],
    multiprocess_mode="max",
)
WORKER_RSS = prom.Gauge(
    name="cellexplain_worker_resident_memory_bytes",
    documentation="Resident memory of the serving workers, summed over live workers (updated "
    "after every onnxruntime call): the soak tests watch it for growth",
    multiprocess_mode="livesum",
)

# the most recent report of any worker wins: a worker killed with SIGKILL leaves its last value
# behind (prometheus_client's "live" modes only drop what a clean exit marks dead)
WORKERS_LIVE = prom.Gauge(
    name="cellexplain_workers_live",
    documentation="Serving worker processes alive in this server, as last counted by a worker "
    "(every 5 s and at every probe; service/workers.py)",
    multiprocess_mode="mostrecent",
)
WORKERS_EXPECTED = prom.Gauge(
    name="cellexplain_workers_expected",
    documentation="Serving worker processes this server started (CELLEXPLAIN_WORKERS, or the "
    "usable CPUs); fewer live ones: /livez and /readyz fail",
    multiprocess_mode="mostrecent",
)


def resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def observe_many(hist: Any, values: np.ndarray) -> None:
    """``hist.observe(v)`` for every value, with one increment per bucket instead of one per
    value (per-cell confidences of a 1024-cell request, observed one by one, took 10% of the
    server's Python time: each observe writes prometheus_client's multiprocess mmap files).

    ``hist`` is a labelled child of a :class:`prometheus_client.Histogram`; this uses its
    ``_upper_bounds``, ``_buckets`` and ``_sum``, the attributes ``Histogram.observe`` itself
    updates (tests/unit/test_metrics.py checks the result equals one observe per value).
    Non-finite values are left out.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]  # one NaN would turn the sum NaN for good
    if values.size == 0:
        return
    bounds = np.asarray(hist._upper_bounds, dtype=np.float64)
    # observe() counts a value in the first bucket whose upper bound is >= it
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    hist._sum.inc(float(values.sum()))
    for bucket, n in zip(hist._buckets, counts[: len(bounds)], strict=True):
        if n:
            bucket.inc(int(n))


# -- bounded HTTP route labels ------------------------------------------------------------------
#: the HTTP paths served, as they are labelled (BentoML's routes, /v1, /v2); any other path is
#: labelled :data:`OTHER_ROUTE`
ROUTES = frozenset(
    {
        "/", "/docs.json", "/livez", "/readyz", "/healthz", "/metrics",
        "/v1/annotate", "/v1/annotate/h5ad", "/v1/models", "/v1/docs", "/v1/redoc",
        "/v1/openapi.json", "/v1/docs/oauth2-redirect",
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/openapi.json",
    }
)  # fmt: skip
#: paths with a client-chosen part (a model name, a version), labelled by their template
_TEMPLATES = (
    (re.compile(r"/v1/models/[^/]+"), "/v1/models/{name}"),
    (re.compile(r"/v2/models/[^/]+"), "/v2/models/{name}"),
    (re.compile(r"/v2/models/[^/]+/ready"), "/v2/models/{name}/ready"),
    (re.compile(r"/v2/models/[^/]+/infer"), "/v2/models/{name}/infer"),
    (re.compile(r"/v2/models/[^/]+/versions/[^/]+"), "/v2/models/{name}/versions/{version}"),
    (
        re.compile(r"/v2/models/[^/]+/versions/[^/]+/ready"),
        "/v2/models/{name}/versions/{version}/ready",
    ),
    (
        re.compile(r"/v2/models/[^/]+/versions/[^/]+/infer"),
        "/v2/models/{name}/versions/{version}/infer",
    ),
    (re.compile(r"/static_content/.*"), "/static_content/{file}"),
)
OTHER_ROUTE = "other"


def route_label(path: str) -> str:
    """The ``endpoint`` label of a request to ``path``: the path itself for a fixed route, its
    template for a route with a model name or version in it, :data:`OTHER_ROUTE` for anything
    else. A client chooses the path, so labelling by it would make every new path a new series
    (20,000 random paths grew a worker by 540 MB and ``/metrics`` to 87 MB)."""
    if path in ROUTES:
        return path
    for pattern, template in _TEMPLATES:
        if pattern.fullmatch(path):
            return template
    return OTHER_ROUTE


def bound_http_route_labels() -> bool:
    """Make BentoML's HTTP request metrics (``bentoml_service_request_*``, labelled
    ``endpoint``) label requests by :func:`route_label` instead of the raw path.

    BentoML's metrics middleware is the outermost layer of its app and reads
    ``scope["path"]`` before anything of ours runs, so its ``__call__`` is wrapped: it is given
    a scope whose path is the label, and the app behind it the request's real scope. Returns
    whether the wrapper is in place (BentoML 1.4's middleware; a test fails if an upgrade
    moves it)."""
    try:
        from bentoml._internal.server.http.instruments import (
            RunnerTrafficMetricsMiddleware as Middleware,
        )
    except ImportError:  # pragma: no cover
        log.error("BentoML's metrics middleware moved: request metrics keep raw paths")
        return False
    original = Middleware.__call__
    if getattr(original, "_cellexplain_bounded", False):
        return True

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path") if scope.get("type") == "http" else None
        label = route_label(path) if isinstance(path, str) else None
        if label is None or label == path:
            await original(self, scope, receive, send)
            return
        if not self._is_setup:
            self._setup()
        app = self.app

        async def with_real_path(_: Any, receive_: Any, send_: Any) -> None:
            await app(scope, receive_, send_)

        view = copy.copy(self)  # per request: the middleware object is shared
        view.app = with_real_path
        await original(view, {**scope, "path": label}, receive, send)

    call._cellexplain_bounded = True  # type: ignore[attr-defined]
    Middleware.__call__ = call  # type: ignore[method-assign]
    return True
