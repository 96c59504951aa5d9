"""cellexplain.service.metrics.observe_many: the same histogram as one observe() per value."""

from __future__ import annotations

import numpy as np
import prometheus_client as prom

from cellexplain.service.metrics import observe_many


def samples(registry: prom.CollectorRegistry, name: str) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name.startswith(name) and not s.name.endswith("_created")
    }


def test_observe_many_equals_one_observe_per_value():
    bounds = (0.0, 0.01, 0.1, 0.5, 1.0)
    rng = np.random.default_rng(0)
    # bucket edges exactly, values between them, above the last bound (+Inf), negatives
    values = np.concatenate([bounds, rng.uniform(-0.1, 1.5, 997), [0.0, 0.0, 2.0]])
    one, bulk = prom.CollectorRegistry(), prom.CollectorRegistry()
    h1 = prom.Histogram("conf", "d", ["model"], buckets=bounds, registry=one).labels(model="m")
    h2 = prom.Histogram("conf", "d", ["model"], buckets=bounds, registry=bulk).labels(model="m")
    for v in values:
        h1.observe(float(v))
    observe_many(h2, values[:500])
    observe_many(h2, values[500:])
    observe_many(h2, np.array([]))
    a, b = samples(one, "conf"), samples(bulk, "conf")
    assert a.keys() == b.keys() and len(a) == len(bounds) + 3  # buckets, +Inf, count, sum
    for key in a:
        assert np.isclose(a[key], b[key], rtol=1e-12), key


def test_non_finite_values_are_left_out_and_cannot_poison_the_sum():
    registry = prom.CollectorRegistry()
    h = prom.Histogram("gap", "d", ["model"], buckets=(0.1, 1.0), registry=registry)
    observe_many(h.labels(model="m"), np.array([0.05, np.nan, np.inf, -np.inf, 0.5]))
    s = samples(registry, "gap")
    assert s["gap_count[('model', 'm')]"] == 2
    assert np.isclose(s["gap_sum[('model', 'm')]"], 0.55)


def test_route_labels_are_bounded_and_name_every_route():
    from cellexplain.service.metrics import OTHER_ROUTE, ROUTES, route_label

    assert route_label("/v1/annotate") == "/v1/annotate"
    assert route_label("/v1/models/pbmc-programs") == "/v1/models/{name}"
    assert (
        route_label("/v2/models/x/versions/3/infer") == "/v2/models/{name}/versions/{version}/infer"
    )
    assert route_label("/v2/models/x/ready") == "/v2/models/{name}/ready"
    for path in ("/random-1", "/v1/models/a/b", "/v1/annotate/x", "/../etc/passwd", ""):
        assert route_label(path) == OTHER_ROUTE, path
    labels = {route_label(f"/v1/models/{i}") for i in range(1000)}
    assert labels == {"/v1/models/{name}"}
    assert all(route_label(r) == r for r in ROUTES)
