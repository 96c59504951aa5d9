"""Locust scenario for the REST API: mixed request sizes and a share of bad requests, with SLOs
that fail the run (exit code 1) when missed.

Headless, against a running server (``make serve``), writing CSV and HTML results::

    locust -f load_tests/locustfile.py --headless --host http://localhost:3000 \\
        -u 16 -r 4 -t 5m --csv load_tests/results/rest --html load_tests/results/rest.html

(``make load-test`` does this.) SLOs (``load_tests/scenario.py``, overridable with ``LOAD_*``
variables): no valid request fails, p99 latency per request size under its bound, every bad
request gets its own 4xx naming the field, and the workers' memory does not grow by more than
``LOAD_MAX_MEMORY_GROWTH_MB`` between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import threading
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `load_tests`

from load_tests import scenario

SLO = scenario.Slo.from_env()
GENES, X = scenario.cells()
BODIES = {n: scenario.rest_body(GENES, X[:n]) for n in scenario.SIZES}
BAD = [
    (b, scenario.rest_body(b.genes, b.cells, model=b.model, ragged=b.ragged))
    for b in scenario.bad_requests(GENES, X)
]
_memory: dict[str, float | None] = {}
_sampler: list[scenario.MemorySampler] = []
_bad_unexpected = 0
_lock = threading.Lock()


class Annotator(HttpUser):
    """A pipeline that annotates as it goes: mostly small requests, some batch-sized ones."""

    wait_time = between(0.0, 0.05)

    @task(int(100 * (1 - scenario.BAD_SHARE)))
    def annotate(self) -> None:
        n = scenario.pick_size()
        name = f"annotate {n} cells" if n > 1 else "annotate 1 cell"
        with self.client.post(
            "/v1/annotate",
            data=BODIES[n],
            headers={"content-type": "application/json"},
            name=name,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif len(r.json()["cells"]) != n:
                r.failure("wrong number of cells in the answer")

    @task(int(100 * scenario.BAD_SHARE))
    def bad_request(self) -> None:
        global _bad_unexpected
        bad, body = random.choice(BAD)
        with self.client.post(
            "/v1/annotate",
            data=body,
            headers={"content-type": "application/json"},
            name=f"bad: {bad.name}",
            catch_response=True,
        ) as r:
            error: dict[str, Any] = {}
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                error = r.json().get("error", {})
            if r.status_code == bad.status and error.get("field") == bad.field:
                r.success()  # the expected refusal is a success of the service
            else:
                with _lock:
                    _bad_unexpected += 1
                r.failure(f"expected {bad.status} naming {bad.field!r}, got {r.status_code}")


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    _sampler.append(scenario.MemorySampler(environment.host, SLO.warmup_s))


@events.test_stopping.add_listener
def _stopping(environment: Any, **_: Any) -> None:
    if _sampler:
        _memory["start"], _memory["end"] = _sampler[0].stop()


@events.quitting.add_listener
def _check_slo(environment: Any, **_: Any) -> None:
    stats = environment.stats
    p99 = {}
    valid = failures = 0
    for entry in stats.entries.values():
        n = scenario.size_of(entry.name)
        if n is None:
            continue
        p99[n] = entry.get_response_time_percentile(0.99)
        valid += entry.num_requests
        failures += entry.num_failures
    problems = scenario.check_slo(
        SLO, p99, valid, failures, _bad_unexpected, _memory.get("start"), _memory.get("end")
    )
    print(
        f"\nSLO: {valid} valid requests ({failures} failed), p99 ms "
        + ", ".join(f"{n} cells {v:.0f}" for n, v in sorted(p99.items()))
        + f"; memory {_memory.get('start')} -> {_memory.get('end')} MB"
        + (f" (samples {_sampler[0].describe()})" if _sampler else ""),
        file=sys.stderr,
    )
    if problems:
        print("SLO MISSED:\n  " + "\n  ".join(problems), file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print("SLO met", file=sys.stderr)
        environment.process_exit_code = 0
