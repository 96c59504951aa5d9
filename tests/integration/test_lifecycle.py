"""Process lifecycle of a real `bentoml serve`: SIGTERM drains in-flight work, a killed worker
is replaced while the service keeps answering, and a request over its timeout gets a 504."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time

import grpc
import httpx
import psutil
import pytest

from cellexplain.api.codegen import load
from cellexplain.service.workers import REFRESH_S
from tests.conftest import raw_cells
from tests.integration.servers import bentoml_server, grpc_serving, running_children

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")

N_CELLS = 3000  # big enough that a few requests queue up behind each other on one worker


@pytest.fixture(scope="module")
def cells(pbmc):
    return raw_cells(pbmc, N_CELLS)


@pytest.fixture(scope="module")
def body(cells) -> bytes:
    genes, X = cells
    return json.dumps({"genes": genes, "cells": X.tolist(), "top_k": 5}).encode()


def workers(proc) -> list[psutil.Process]:
    """The BentoML worker processes under the `bentoml serve` arbiter."""
    return running_children(proc.pid, "_bentoml_impl.worker.service")


def post(url: str, body: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/annotate",
        content=body,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def wait_admitted(url: str, cells: int, timeout: float) -> float:
    """Poll ``/metrics`` until the server has admitted ``cells`` into its queues (whatever
    has run since); the count reached."""
    deadline = time.monotonic() + timeout
    series = r"^cellexplain_admitted_cells_total\{[^}]*\} (\S+)$"
    seen = 0.0
    with httpx.Client(base_url=url, timeout=5) as c:
        while time.monotonic() < deadline:
            seen = sum(float(v) for v in re.findall(series, c.get("/metrics").text, re.M))
            if seen >= cells:
                break
            time.sleep(0.05)
    return seen


def test_sigterm_drains_in_flight_rest_and_grpc(programs_home, cells, body):
    """Kubernetes sends SIGTERM to the container's first process (the arbiter): requests
    already sent, on both doors, still get full answers, and the server exits cleanly."""
    genes, X = cells
    env = {"CELLEXPLAIN_WORKERS": "1", "CELLEXPLAIN_INTRA_OP_THREADS": "1"}
    with bentoml_server(programs_home, env) as srv:
        done: list[tuple[str, object, float]] = []
        # connected before the clock starts (under a loaded machine, a connection still being
        # set up when SIGTERM lands is refused: that is not a request in flight)
        clients = [httpx.Client(base_url=srv.url, timeout=120) for _ in range(4)]
        for c in clients:
            assert c.get("/livez").status_code == 200
        channels = [grpc.insecure_channel(srv.grpc) for _ in range(2)]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)

        def rest_call(client: httpx.Client) -> None:
            r = client.post(
                "/v1/annotate", content=body, headers={"content-type": "application/json"}
            )
            n = len(r.json()["cells"]) if r.status_code == 200 else r.text
            done.append(("rest", (r.status_code, n), time.monotonic()))

        def grpc_call(ch: grpc.Channel) -> None:
            req = pb.AnnotateRequest(
                genes=genes,
                dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
                options=pb.AnnotateOptions(top_k=5),
            )
            try:
                res = pb_grpc.CellExplainStub(ch).Annotate(req, timeout=120)
                done.append(("grpc", ("OK", len(res.cells)), time.monotonic()))
            except grpc.RpcError as e:
                done.append(("grpc", (e.code().name, e.details()), time.monotonic()))

        threads = [threading.Thread(target=rest_call, args=(c,)) for c in clients]
        threads += [threading.Thread(target=grpc_call, args=(ch,)) for ch in channels]
        for t in threads:
            t.start()
        # all six are in the worker's hands (admitted: queued, running or answered) before
        # SIGTERM: on a loaded machine a 9 MB gRPC message could still be on its way after a
        # fixed sleep, and a call not yet started when the drain begins is not in flight
        admitted = wait_admitted(srv.url, 6 * N_CELLS, timeout=20)
        assert admitted >= 6 * N_CELLS, admitted
        sigterm_at = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(timeout=180)
        for c in clients:
            c.close()
        for ch in channels:
            ch.close()
        assert srv.proc.wait(timeout=60) == 0
    answers = sorted((door, str(res)) for door, res, _ in done)
    assert answers == [("grpc", str(("OK", N_CELLS)))] * 2 + [("rest", str((200, N_CELLS)))] * 4
    # the drain was real: some requests were answered after SIGTERM
    assert sum(at > sigterm_at for _, _, at in done) >= 2


def test_killed_worker_is_replaced(programs_home, body):
    """SIGKILL one of two workers: the other keeps answering, and the arbiter starts a new
    one (outside a container; in one, the liveness probe restarts the pod instead)."""
    env = {"CELLEXPLAIN_WORKERS": "2", "CELLEXPLAIN_INTRA_OP_THREADS": "1"}
    with bentoml_server(programs_home, env) as srv:
        before = workers(srv.proc)
        assert len(before) == 2
        victim = before[0]
        victim.kill()
        victim.wait(timeout=10)
        # the survivor answers at once (REST shares the socket; gRPC uses SO_REUSEPORT)
        statuses = [post(srv.url, body).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        deadline = time.monotonic() + 90
        while True:
            now = workers(srv.proc)
            if len(now) == 2 and victim.pid not in {p.pid for p in now}:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            time.sleep(0.5)
        # wait until the replacement has loaded its model, then use both workers
        for _ in range(120):
            if httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200:
                break
            time.sleep(0.5)
        statuses = [post(srv.url, body).status_code for _ in range(6)]
        assert statuses == [200] * 6
        assert _worker_gauges(srv.url) == (2.0, 2.0)


def _worker_gauges(url: str) -> tuple[float, float]:
    """(cellexplain_workers_live, cellexplain_workers_expected) from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = dict(re.findall(r"^(cellexplain_workers_\w+) (\S+)$", text, re.M))
    return float(found["cellexplain_workers_live"]), float(found["cellexplain_workers_expected"])


def test_a_dead_worker_in_a_container_fails_the_probes(programs_home, body):
    """Inside a Bento image (BENTOML_CONTAINERIZED) the arbiter starts no replacement: the
    survivor keeps answering requests, but /livez and /readyz fail (the kubelet restarts the
    container) and the gauges say one of two."""
    env = {
        "CELLEXPLAIN_WORKERS": "2",
        "CELLEXPLAIN_INTRA_OP_THREADS": "1",
        "BENTOML_CONTAINERIZED": "true",
    }
    with bentoml_server(programs_home, env) as srv:
        assert httpx.get(f"{srv.url}/livez", timeout=5).status_code == 200
        assert _worker_gauges(srv.url) == (2.0, 2.0)
        victim = workers(srv.proc)[0]
        victim.kill()
        victim.wait(timeout=10)
        assert post(srv.url, body).status_code == 200
        probes = ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready",
                  "/v2/models/pbmc-programs/ready")  # fmt: skip
        for probe in probes * 3:  # KServe's probes read the status code of the /v2 ones
            assert httpx.get(f"{srv.url}{probe}", timeout=5).status_code == 503, probe
        assert _worker_gauges(srv.url) == (1.0, 2.0)
        # gRPC health too, within the watch's period (for meshes and grpc probes)
        deadline = time.monotonic() + 2 * REFRESH_S + 2
        while grpc_serving(srv.grpc):
            assert time.monotonic() < deadline, "gRPC health still SERVING"
            time.sleep(0.5)
        time.sleep(3)
        assert len(workers(srv.proc)) == 1  # nobody replaced it


def test_request_timeout_gives_504_and_deadline_exceeded(programs_home, cells, body):
    genes, X = cells
    env = {"CELLEXPLAIN_WORKERS": "1", "CELLEXPLAIN_REQUEST_TIMEOUT_S": "0.001"}
    with bentoml_server(programs_home, env) as srv:
        r = post(srv.url, body)
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["type"] == "timeout" and "CELLEXPLAIN_REQUEST_TIMEOUT_S" in err["message"]
        req = pb.AnnotateRequest(
            genes=genes,
            dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
        )
        with grpc.insecure_channel(srv.grpc) as ch, pytest.raises(grpc.RpcError) as e:
            pb_grpc.CellExplainStub(ch).Annotate(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert 'cellexplain_request_errors_total{door="rest",type="timeout"} 1.0' in metrics
        assert 'cellexplain_request_errors_total{door="grpc",type="timeout"} 1.0' in metrics
        assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200


@pytest.mark.parametrize("graceful_flag", [True, False], ids=["make-serve", "bare-bentoml-serve"])
def test_sigterm_exit_fits_the_budget_whatever_clients_do(programs_home, graceful_flag):
    """A never-ending upload and an idle gRPC stream cannot hold the pod past its budget: the
    worker is gone CELLEXPLAIN_SHUTDOWN_GRACE_S + EXIT_MARGIN_S after SIGTERM, whether uvicorn
    was told the grace (make serve, the deployment) or not (the watchdog then ends it)."""
    import socket
    from urllib.parse import urlparse

    from cellexplain.service.shutdown import EXIT_MARGIN_S

    grace = 4.0
    env = {"CELLEXPLAIN_WORKERS": "1", "CELLEXPLAIN_SHUTDOWN_GRACE_S": str(grace)}
    with bentoml_server(programs_home, env, graceful_flag=graceful_flag) as srv:
        u = urlparse(srv.url)
        upload = socket.create_connection((u.hostname, u.port))
        upload.sendall(
            b"POST /v1/annotate/h5ad HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000000\r\n\r\n"
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.h5ad"\r\n\r\n'
        )
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.2 s: the upload never ends, never idles out
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):
                    upload.sendall(b"\0")

        def idle_requests():
            stop.wait()
            yield from ()

        threading.Thread(target=trickle, daemon=True).start()
        channel = grpc.insecure_channel(srv.grpc)
        stream = pb_grpc.CellExplainStub(channel).AnnotateStream(idle_requests())
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        try:
            srv.proc.wait(timeout=grace + EXIT_MARGIN_S + 30)
        finally:
            stop.set()
            upload.close()
        elapsed = time.monotonic() - t0
        with contextlib.suppress(grpc.RpcError):
            list(stream)
        channel.close()
    # the budget, plus a little for the arbiter and the test's own polling
    assert elapsed <= grace + EXIT_MARGIN_S + 3, f"exited {elapsed:.1f} s after SIGTERM"
    if graceful_flag:  # the clean path does not need the watchdog
        assert elapsed <= grace + 3, f"exited {elapsed:.1f} s after SIGTERM"


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        (
            {"CELLEXPLAIN_WORKERS": "abc", "CELLEXPLAIN_MALLOC_TRIM_S": "inf"},
            "cellexplain: bad setting: CELLEXPLAIN_WORKERS='abc'",
        ),
        # checked once before any worker starts (workers that fail are restarted without end)
        ({"CELLEXPLAIN_MODELS": "nope:zz"}, "cellexplain: CELLEXPLAIN_MODELS: model 'nope:zz'"),
    ],
)
def test_a_bad_setting_stops_the_server_with_one_line_naming_the_variable(tmp_path, bad, line):
    """No traceback through BentoML's loader: the variable, its value and the problem."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path),
        "BENTOML_DO_NOT_TRACK": "True",
        **bad,
    }
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "cellexplain.service.rest:CellExplain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[-1].startswith(line), lines
    if "CELLEXPLAIN_MALLOC_TRIM_S" in bad:
        assert "CELLEXPLAIN_MALLOC_TRIM_S='inf': Input should be a finite number" in lines[-1]
