"""Three times capacity (load_tests/overload.py), against a server of its own held to one CPU:
refused at once, the queue rising with the load and falling after. A module of its own, in
`make test-deploy`: beside the load tests' server it measured refusals 20x slower."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.conftest import require
from tests.integration.servers import bentoml_server
from tests.integration.test_load import run

pytestmark = [pytest.mark.integration, pytest.mark.deploy]


@pytest.fixture(scope="module")
def pinned_server(programs_home):
    """One worker held to CPU 0, as a pod's CPU limit would hold it; the load comes from CPU
    1, as from clients elsewhere (sharing the server's CPU, the driver slows what it measures)."""
    require(
        shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2, "needs taskset, 2 CPUs"
    )
    env = {"CELLEXPLAIN_WORKERS": "1", "CELLEXPLAIN_INTRA_OP_THREADS": "1"}
    with bentoml_server(programs_home, env, cpus="0") as srv:
        yield srv


@pytest.mark.parametrize("door", ["grpc", "oip-rest"])
def test_three_times_capacity_is_refused_at_once_and_the_queue_rises_and_falls(
    pinned_server, tmp_path, door
):
    """load_tests/overload.py with 1024-cell calls, over gRPC and over OIP REST with binary
    tensors (tritonclient's encoding): the capacity measured, then open-loop arrivals at 0.5x,
    1x and 3x of it and a drain. Past the queue bound calls are refused (RESOURCE_EXHAUSTED
    with retry-after, 503 with Retry-After), every refusal within a second; no call gets
    anything else (no timeout, no 504); the queue gauge rises with the offered load and is
    back to 0 after."""
    out_json = tmp_path / "overload.json"
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "load_tests.overload",
           "--url", pinned_server.url, "--grpc", pinned_server.grpc, "--door", door,
           "--cells", "1024", "--phase-s", "10", "--probe-s", "6", "--refusal-s", "1",
           "--json", str(out_json)]  # fmt: skip
    out = run(cmd)
    print(out.stdout)  # the phases, shown with -s and on a failure
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    low, one, three, drain = result["phases"]
    assert low["queue_mean"] <= one["queue_mean"] < three["queue_mean"], result["phases"]
    assert three["refused"] > 0 and three["refusal_max_s"] <= 1.0
    assert all(not p["other"] for p in result["phases"])
    assert drain["queue_last"] == 0
