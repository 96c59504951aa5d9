"""Faults and work that explodes inside a parser, against a real `bentoml serve` (security round
3): uploads that hang HDF5 or expand in it, metric labels a client chooses, checks that grow
faster than the request, a full temporary disk, SIGTERM in the middle of it all.

What must hold: every such request gets its own 4xx (or 507) naming the problem within a
bounded time, while the worker's probes (HTTP and gRPC health) keep answering; nothing is left
in the temporary folder; no process outlives the server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import httpx
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from cellexplain.api.codegen import load
from cellexplain.service import metrics, protowire
from cellexplain.service.sandbox import UPLOAD_PREFIX
from tests.integration import hostile_inputs as hostile
from tests.integration.servers import REPO, bentoml_server, running_children, worker_process

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")

MODEL = "pbmc-programs"
HANGING = sorted((REPO / "tests" / "fixtures" / "hostile").glob("hang_*.h5ad"))
UPLOAD_TIMEOUT_S = 6
UPLOAD_MEMORY = 512 * 1024**2
ENV = {
    "CELLEXPLAIN_MODELS": MODEL,
    "CELLEXPLAIN_WORKERS": "1",
    "CELLEXPLAIN_INTRA_OP_THREADS": "1",
    "CELLEXPLAIN_MAX_CELLS_PER_REQUEST": "2000",
    "CELLEXPLAIN_MAX_H5AD_BYTES": str(32 * 1024**2),
    "CELLEXPLAIN_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S),
    "CELLEXPLAIN_UPLOAD_MEMORY_BYTES": str(UPLOAD_MEMORY),
    "CELLEXPLAIN_HTTP_HEADER_TIMEOUT_S": "2",
    "CELLEXPLAIN_HTTP_BODY_TIMEOUT_S": "2",
    "CELLEXPLAIN_MAX_INFLIGHT_BYTES": str(4 * 1024**2),
}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def tmpdir(tmp_path_factory) -> Path:
    """The server's TMPDIR, holding a dead worker's leftover upload and a live one's."""
    tmp = tmp_path_factory.mktemp("server-tmp")
    orphan = tmp / f"{UPLOAD_PREFIX}{_dead_pid()}-abc"
    orphan.mkdir()
    (orphan / "upload.h5ad").write_bytes(b"\0" * 1000)
    (tmp / f"{UPLOAD_PREFIX}{os.getpid()}-live").mkdir()
    return tmp


@pytest.fixture(scope="module")
def server(programs_home, tmpdir):
    with bentoml_server(programs_home, {**ENV, "TMPDIR": str(tmpdir)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def genes(programs_model) -> list[str]:
    return list(programs_model[0].genes)


@contextlib.contextmanager
def peak_growth(server) -> Iterator[list[float]]:
    """Yields a list that receives the worker's peak RSS growth over the block (bytes): the
    peak (VmHWM) is reset first, so only this block's allocations count."""
    w = worker_process(server)
    Path(f"/proc/{w.pid}/clear_refs").write_text("5")
    before = w.memory_info().rss
    out: list[float] = []
    yield out
    status = Path(f"/proc/{w.pid}/status").read_text().splitlines()
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    out.append(peak_kb * 1024 - before)


def _sandboxes(server) -> list[psutil.Process]:
    return running_children(server.proc.pid, "cellexplain.service.sandbox")


def _upload(client, path: Path, **data) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/v1/annotate/h5ad", files={"file": ("cells.h5ad", f)}, data=data)


@contextlib.contextmanager
def probes_watched(server) -> Iterator[list[float]]:
    """Polls /livez, /readyz and gRPC health every 0.2 s over the block; yields a list that
    receives the slowest answer (s; a probe that failed counts as 99)."""
    worst = [0.0]
    done = threading.Event()

    def poll() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=5) as c,
            grpc.insecure_channel(server.grpc) as ch,
        ):
            health = health_pb2_grpc.HealthStub(ch)
            while not done.is_set():
                for probe in ("/livez", "/readyz", "grpc"):
                    t0 = time.monotonic()
                    try:
                        if probe == "grpc":
                            res = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                            ok = res.status == health_pb2.HealthCheckResponse.SERVING
                        else:
                            ok = c.get(probe).status_code == 200
                    except (httpx.HTTPError, grpc.RpcError):
                        ok = False
                    worst[0] = max(worst[0], time.monotonic() - t0 if ok else 99.0)
                time.sleep(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out: list[float] = []
    try:
        yield out
    finally:
        done.set()
        t.join()
        out.append(worst[0])


def _uploads_left(tmpdir: Path) -> list[str]:
    return sorted(
        p.name for p in tmpdir.glob(f"{UPLOAD_PREFIX}*") if str(os.getpid()) not in p.name
    )


# -- uploads are read in a process that may die -------------------------------------------------
def test_a_dead_workers_uploads_are_removed_at_start_and_a_live_ones_kept(server, tmpdir):
    assert _uploads_left(tmpdir) == []
    assert (tmpdir / f"{UPLOAD_PREFIX}{os.getpid()}-live").is_dir()


@pytest.mark.parametrize("path", HANGING, ids=[p.stem for p in HANGING])
def test_a_file_that_hangs_hdf5_is_a_422_and_the_worker_stays_live(client, server, tmpdir, path):
    """The shared fixtures: HDF5 loops for ever holding the GIL. Read in a child process, the
    worker waits on a pipe: its probes answer throughout, the child is killed at the limit."""
    assert len(HANGING) == 4
    t0 = time.monotonic()
    with probes_watched(server) as worst:
        r = _upload(client, path)
    took = time.monotonic() - t0
    assert r.status_code == 422, r.text[:400]
    err = r.json()["error"]
    assert err["field"] == "file" and "CELLEXPLAIN_UPLOAD_TIMEOUT_S" in err["message"]
    assert UPLOAD_TIMEOUT_S - 1 < took < UPLOAD_TIMEOUT_S + 10, took
    assert worst[0] < 2, f"a probe took {worst[0]:.1f} s during the upload"
    assert _sandboxes(server) == []
    assert _uploads_left(tmpdir) == []


def test_a_decompression_bomb_is_a_413_and_the_worker_does_not_grow(
    client, server, genes, tmpdir, tmp_path
):
    """1,024 bytes declared, a few KB in the file, 1 GiB once HDF5 inflates it twice: the
    child's address-space limit stops it; the worker never holds it."""
    path = hostile.double_deflate(hostile.small_adata(genes), tmp_path / "bomb.h5ad", 1 << 30)
    assert path.stat().st_size < 1 << 20
    with peak_growth(server) as growth:
        r = _upload(client, path)
        assert r.status_code == 413, r.text[:400]
        assert "CELLEXPLAIN_UPLOAD_MEMORY_BYTES" in r.json()["error"]["message"]
    assert growth[0] < 64 * 1024**2
    assert _uploads_left(tmpdir) == []


def test_too_many_objects_are_refused_before_anndata_reads_them(client, genes, tmp_path):
    path = hostile.many_scalars(hostile.small_adata(genes), tmp_path / "many.h5ad", 12_000)
    t0 = time.monotonic()
    r = _upload(client, path)
    assert r.status_code == 400 and "too many objects" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < UPLOAD_TIMEOUT_S


def test_a_valid_upload_still_gives_the_same_answer_as_the_json_door(
    client, genes, tmp_path, counts_h5ad
):
    import anndata as ad

    r = _upload(client, counts_h5ad, top_k="3")
    assert r.status_code == 200, r.text[:400]
    out = tmp_path / "out.h5ad"
    out.write_bytes(r.content)
    annotated = ad.read_h5ad(out)
    source = ad.read_h5ad(counts_h5ad)
    X = source.X[:40]
    j = client.post(
        "/v1/annotate",
        json={"genes": list(source.var_names), "cells": X.tolist(), "top_k": 3},
    )
    assert j.status_code == 200
    labels = [c["label"] for c in j.json()["cells"]]
    assert list(annotated.obs["cellexplain_label"][:40]) == labels
    assert annotated.n_obs == source.n_obs and "bulk_labels" in annotated.obs


def test_strings_sharing_one_heap_string_in_uns_fail_while_written(
    client, server, genes, tmp_path, tmpdir
):
    """2,000 strings of 100,000 characters once read: 200 MB to write back, 6x the 32 MiB
    upload limit. The reader's files are bounded (RLIMIT_FSIZE): the write fails at the
    bound, not after filling the disk."""
    path = hostile.shared_heap_strings(
        hostile.small_adata(genes, n_cells=2000), tmp_path / "uns-heap.h5ad", "uns", 100_000
    )
    r = _upload(client, path)
    assert r.status_code == 413, r.text[:300]
    assert "CELLEXPLAIN_MAX_H5AD_BYTES" in r.json()["error"]["message"]
    assert _uploads_left(tmpdir) == []


def test_names_sharing_one_heap_string_are_refused(client, server, genes, tmp_path, tmpdir):
    path = hostile.shared_heap_strings(
        hostile.small_adata(genes, n_cells=2000), tmp_path / "heap.h5ad", "obs_names", 100_000
    )
    assert path.stat().st_size < 4 << 20  # ...and 200 MB of names once read
    with peak_growth(server) as growth:
        r = _upload(client, path)
        assert r.status_code == 400, r.text[:300]
        assert "100000 characters" in r.json()["error"]["message"]
    assert growth[0] < 64 * 1024**2
    assert _uploads_left(tmpdir) == []


def test_a_client_that_leaves_mid_upload_frees_its_slot_at_once(server, client, tmpdir):
    """The reader of an upload whose client went away is killed then, not at its timeout: the
    next upload does not wait for it."""
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    data = HANGING[0].read_bytes()
    head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.h5ad"\r\n\r\n'
    body = head + data + b"\r\n--xyz--\r\n"
    with socket.create_connection((host, port)) as s:
        s.sendall(
            b"POST /v1/annotate/h5ad HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while not _sandboxes(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sandboxes(server), "the upload's reader never started"
    t0 = time.monotonic()  # the client is gone
    while _sandboxes(server) and time.monotonic() - t0 < UPLOAD_TIMEOUT_S:
        time.sleep(0.1)
    assert time.monotonic() - t0 < 2, "the reader outlived its client"
    time.sleep(0.5)
    assert _uploads_left(tmpdir) == []


def test_grpc_messages_of_millions_of_tiny_fields_are_refused_before_parsing(server):
    """Counted in the wire bytes: empty OIP inputs, parameters, unknown fields of a typed
    request. Each used to take gigabytes and seconds of the gRPC loop (health waited)."""
    empty_inputs = protowire.length_prefix(5, 0) * 5_000_000  # ModelInferRequest.inputs
    unknown = (protowire.key(111, protowire.VARINT) + b"\x00") * 2_000_000
    elements = protowire.length_prefix(8, 0) * 10_000_000  # one level down: bytes_contents
    contents = protowire.length_prefix(5, len(elements)) + elements
    one_input = protowire.length_prefix(5, len(contents)) + contents
    cases = [
        ("/inference.GRPCInferenceService/ModelInfer", empty_inputs, "more than 8 inputs"),
        ("/cellexplain.v1.CellExplain/Annotate", unknown, "fields it does not define"),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            one_input,
            "more than 8 inputs.contents.bytes_contents",
        ),
    ]
    options = [("grpc.max_send_message_length", -1)]
    for method, message, expected in cases:
        with peak_growth(server) as growth:
            with probes_watched(server) as worst, grpc.insecure_channel(server.grpc, options) as ch:
                call = ch.unary_unary(
                    method, request_serializer=lambda b: b, response_deserializer=lambda b: b
                )
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    call(message, timeout=60)
                took = time.monotonic() - t0
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert expected in (e.value.details() or ""), e.value.details()
            assert took < 2 and worst[0] < 1, (method, took, worst)
        assert growth[0] < 20 * len(message), (method, growth[0] / 2**20)


# -- metric labels a client cannot choose -------------------------------------------------------
def test_random_paths_cost_what_a_fixed_path_costs(client, server):
    """Random paths (and random model names) share one label each: 4,000 of them cost the
    worker no more memory than 4,000 requests to two fixed unknown paths (measured: 2,000,
    doubled), /metrics gains no series (its size is the check that would catch a label per
    path: each series is ~100 bytes) and stays fast.

    (Every request to this BentoML server, /livez included, costs its worker ~5 KB that is
    never returned, whatever the path: measured here as the fixed-path baseline, reported in
    docs/security.md; not ours to fix in this test.)"""

    def hit(n: int, random_paths: bool) -> float:
        w = worker_process(server)
        before = w.memory_info().rss
        for i in range(n):
            name = uuid.uuid4().hex if random_paths else "no-such-thing"
            path = f"/{name}" if i % 2 else f"/v1/models/{name}"
            assert client.get(path).status_code == 404
        return (w.memory_info().rss - before) / 2**20

    hit(500, True)  # every code path warm
    hit(500, False)
    size_before = len(client.get("/metrics").content)
    # interleaved rounds, so that a drift of the worker's heap over the test (its allocator's
    # arenas, the trims every second) weighs on both kinds alike: measured one after the
    # other, random paths came out at 0.96x or 1.4x the fixed ones' cost per request
    fixed = random = 0.0
    for _ in range(2):
        fixed += hit(1_000, False)
        random += hit(2_000, True)
    t0 = time.monotonic()
    scrape = client.get("/metrics")
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert len(scrape.content) < size_before + 4096
    # RSS moves by several MiB either way over a round (the allocator's trims: fixed paths have
    # come out at -7 MiB), so the fixed paths' cost counts as at least the ~10 MiB their
    # requests are known to cost; a series per path cost 27 KB each (+108 MiB here)
    bound = 2.5 * max(fixed, 10) + 16
    assert random < bound, f"random paths: +{random:.0f} MiB; fixed: +{fixed:.0f}"
    endpoints = {
        line.split('endpoint="', 1)[1].split('"', 1)[0]
        for line in scrape.text.splitlines()
        if line.startswith("bentoml_service_request_total{")
    }
    assert {"/v1/models/{name}", metrics.OTHER_ROUTE} <= endpoints
    assert all(e in metrics.ROUTES or "{" in e or e == metrics.OTHER_ROUTE for e in endpoints)


# -- no check grows faster than the request -----------------------------------------------------
def test_two_million_requested_outputs_are_refused_at_once(server, genes):
    req = oip_pb.ModelInferRequest(model_name=MODEL)
    x = req.inputs.add(name="x", datatype="FP32", shape=[1, len(genes)])
    x.contents.fp32_contents.extend([0.0] * len(genes))
    for _ in range(2_000_000):
        req.outputs.add()
    assert req.ByteSize() > 4_000_000
    options = [("grpc.max_send_message_length", -1)]
    with probes_watched(server) as worst, grpc.insecure_channel(server.grpc, options) as ch:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
        took = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 64 outputs" in (e.value.details() or "")
    assert took < 1.0, took
    assert worst[0] < 2


@pytest.mark.parametrize("case", ["1000-dims", "int64-x", "uint64-x"])
def test_oip_grpc_declared_shapes_and_types_are_checked_before_the_values(server, genes, case):
    req = oip_pb.ModelInferRequest(model_name=MODEL)
    if case == "1000-dims":
        x = req.inputs.add(name="x", datatype="FP32", shape=[1] * 1000)
        x.contents.fp32_contents.append(0.0)
        expected = "1000 dimensions"
    else:  # a million values of a type x is not taken in: refused before any is read
        datatype = "INT64" if case == "int64-x" else "UINT64"
        x = req.inputs.add(name="x", datatype=datatype, shape=[1000, 1000])
        field = "int64_contents" if case == "int64-x" else "uint64_contents"
        getattr(x.contents, field).extend(range(1_000_000))
        expected = f"must be FP32, got '{datatype}'"
    with peak_growth(server) as growth:
        with grpc.insecure_channel(server.grpc) as ch, pytest.raises(grpc.RpcError) as e:
            oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert expected in (e.value.details() or "")
    assert growth[0] < 64 * 1024**2  # the message is 8 MB; its values were never listed


def test_garbage_to_grpc_health_is_invalid_argument(server):
    with grpc.insecure_channel(server.grpc) as ch:
        check = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as e:
            check(b"\xff\xff\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_message_of_millions_of_empty_cells_is_refused_before_it_is_parsed(server):
    """Four million empty sparse cells: 8 MB on the wire, ~2.6 GB once parsed. Counted in the
    wire bytes first: refused at once, the worker unmoved."""
    cell = protowire.length_prefix(1, 0)  # SparseCells.cells: one empty SparseCell
    sparse = cell * 4_000_000
    message = protowire.length_prefix(4, len(sparse)) + sparse  # AnnotateRequest.sparse
    assert len(message) < 9 * 1024**2
    with peak_growth(server) as growth:
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(server.grpc, options) as ch:
            call = ch.unary_unary(
                "/cellexplain.v1.CellExplain/Annotate",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call(message, timeout=60)
            took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "more than 2000 cells" in (e.value.details() or "")
        assert took < 2, took
    assert growth[0] < 20 * len(message)


def test_cancelled_streams_leave_nothing_behind(server, genes):
    """A client that cancels AnnotateStream after its first answer: the chunks still queued
    and running are cancelled with it (each cancelled stream used to keep 17-30 MB)."""
    rng = np.random.default_rng(0)
    chunk = rng.poisson(1.0, size=(2000, len(genes))).astype(np.float32)

    def requests() -> Iterator[Any]:
        for i in range(10):
            yield pb.AnnotateRequest(
                genes=genes if i == 0 else [],
                dense=pb.DenseMatrix(
                    n_cells=chunk.shape[0], raw_le_float32=chunk.astype("<f4").tobytes()
                ),
                options=pb.AnnotateOptions(attributions=2),  # full attributions: large answers
            )

    def cancel_after_first(n: int) -> None:
        with grpc.insecure_channel(server.grpc) as ch:
            stub = pb_grpc.CellExplainStub(ch)
            for _ in range(n):
                call = stub.AnnotateStream(requests(), timeout=120)
                next(call)
                call.cancel()

    w = worker_process(server)
    sizes = []
    for _ in range(3):  # the first 20 bring the worker to its working size
        cancel_after_first(20)
        time.sleep(3)  # cancelled chunks unwind
        sizes.append(w.memory_info().rss / 2**20)
    print("RSS after each 20 cancelled streams (MiB):", [round(x) for x in sizes])
    # one stream's working set (4 chunks of 2,000 cells in flight, IG's intermediate tensors in
    # onnxruntime's arena) is ~250 MB. Measured: a sawtooth within it (335, 394, 431, 518, 339,
    # 386, 460, 491 MiB over 200 streams: cancelled tasks' frames are freed by Python's cycle
    # collector in batches), no growth beyond it
    assert max(sizes[1:]) < sizes[0] + 256, sizes


# -- connections that hold a worker without finishing a request ----------------------------------
def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass  # an answer (408/400) is fine too; what matters is that it ends
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_header_connections_are_closed(server, client):
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    idle = [socket.create_connection((host, port)) for _ in range(100)]
    slow = [socket.create_connection((host, port)) for _ in range(50)]
    for s in slow:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    for _ in range(6):  # a header line every 0.5 s: never a complete head
        time.sleep(0.5)
        for s in slow:
            with contextlib.suppress(OSError):
                s.sendall(b"X-Slow: 1\r\n")
    answered = [socket.create_connection((host, port)) for _ in range(20)]
    for s in answered:  # a body declared and never sent, to a route that reads none
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\nx")
    assert all(_closed_by_server(s, 5) for s in idle + slow + answered)
    assert time.monotonic() - t0 < 10
    assert client.get("/livez").status_code == 200
    for s in idle + slow + answered:
        s.close()


def test_a_body_that_stops_arriving_is_a_408(server):
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    with socket.create_connection((host, port)) as s:
        s.sendall(
            b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"genes": ['
        )
        s.settimeout(10)
        t0 = time.monotonic()
        answer = s.recv(65536)
        took = time.monotonic() - t0
        with contextlib.suppress(OSError):
            while b"}}" not in answer and (more := s.recv(65536)):
                answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"CELLEXPLAIN_HTTP_BODY_TIMEOUT_S" in answer
    assert 1.5 < took < 6


def test_bodies_past_the_worker_budget_wait_their_turn_with_a_503(server, client):
    """CELLEXPLAIN_MAX_INFLIGHT_BYTES is 4 MiB here: a body that has sent 3 MiB and pauses
    holds 3 MiB; a 2 MiB one beside it gets 503 + Retry-After at once, a small GET still
    answers. Bytes are held as they arrive, and what a declared body has yet to send counts
    only as far as its pace bears it out (gate.Pending): connections that declare large bodies
    and trickle them, a byte every 0.1 s, hold what they trickle and block nobody."""
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    tricklers = [socket.create_connection((host, port)) for _ in range(4)]
    for t in tricklers:  # 4 x 64 MiB declared, then a byte at a time
        t.sendall(
            b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {64 << 20}\r\n\r\n".encode()
            + b"{"
        )
    trickling = threading.Event()

    def trickle() -> None:
        while not trickling.wait(0.1):
            for t in tricklers:
                with contextlib.suppress(OSError):
                    t.sendall(b" ")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for _ in range(3):  # as they trickle on
            time.sleep(0.4)
            r = client.post(
                "/v1/annotate", content=b"{}", headers={"content-type": "application/json"}
            )
            assert r.status_code == 400, r.text[:300]  # admitted beside them
    finally:
        trickling.set()
        trickler.join()
    for t in tricklers:
        t.close()
    with socket.create_connection((host, port)) as held:
        held.sendall(
            b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {3 << 20}\r\n\r\n".encode()
            + b" " * ((3 << 20) - 1)
        )
        time.sleep(0.3)
        r = client.post(
            "/v1/annotate",
            content=b" " * (2 << 20),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 503, r.text[:300]
        assert r.headers["retry-after"] == "1"
        assert "CELLEXPLAIN_MAX_INFLIGHT_BYTES" in r.json()["error"]["message"]
        assert client.get("/v1/models").status_code == 200
    time.sleep(2.5)  # the held body times out (408) and releases its share
    r = client.post("/v1/annotate", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400  # admitted (and refused for what it is)


def test_a_body_trickled_after_a_large_first_piece_gets_408_and_releases_its_share(server, client):
    """3 MiB at once, then a byte every 0.5 s: each piece comes within the 2 s body timeout,
    but the body averages far less than CELLEXPLAIN_HTTP_BODY_MIN_RATE over a window, so it
    gets 408 and its 3 MiB of the 4 MiB budget are released (it had held them indefinitely,
    refusing every other body, for a byte every few seconds)."""
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    two_mib = {"content": b" " * (2 << 20), "headers": {"content-type": "application/json"}}
    with socket.create_connection((host, port)) as held:
        held.sendall(
            b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {4 << 20}\r\n\r\n".encode()
            + b" " * (3 << 20)
        )
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(OSError):
                    held.sendall(b" ")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            time.sleep(0.3)
            t0 = time.monotonic()
            assert client.post("/v1/annotate", **two_mib).status_code == 503  # the budget held
            while (r := client.post("/v1/annotate", **two_mib)).status_code == 503:
                assert time.monotonic() - t0 < 10, "the trickled body still holds its share"
                time.sleep(0.25)
            assert r.status_code == 400  # admitted (and refused for what it is)
            held.settimeout(5)
            answer = held.recv(65536)
        finally:
            stop.set()
            trickler.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"CELLEXPLAIN_HTTP_BODY_MIN_RATE" in answer


# -- SIGTERM in the middle of a hanging upload --------------------------------------------------
def test_sigterm_during_a_hanging_upload_ends_every_process(programs_home, tmp_path):
    grace = 3
    env = {
        **ENV,
        "TMPDIR": str(tmp_path),
        "CELLEXPLAIN_UPLOAD_TIMEOUT_S": "120",
        "CELLEXPLAIN_UPLOAD_CPU_S": "120",
        "CELLEXPLAIN_SHUTDOWN_GRACE_S": str(grace),
    }
    with bentoml_server(programs_home, env) as srv:
        answers: list[object] = []

        def upload() -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=60) as c:
                    answers.append(_upload(c, HANGING[1]).status_code)
            except httpx.HTTPError as e:
                answers.append(e)

        t = threading.Thread(target=upload)
        t.start()
        deadline = time.monotonic() + 30
        while not _sandboxes(srv) and time.monotonic() < deadline:
            time.sleep(0.2)
        procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(True)]
        assert _sandboxes(srv), "the upload's reader never started"
        time.sleep(1)
        srv.proc.send_signal(signal.SIGTERM)  # the arbiter, as a kubelet does (PID 1)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(procs, timeout=grace + 5 + 10)
        took = time.monotonic() - t0
        t.join(timeout=30)
        assert alive == [], f"still alive {took:.0f} s after SIGTERM: {alive}"
        assert list(tmp_path.glob(f"{UPLOAD_PREFIX}*")) == []
        # the server's own stop: a 503 (send it again elsewhere), or the connection closed;
        # never a 400 that blames the file
        assert answers and (answers[0] == 503 or isinstance(answers[0], httpx.HTTPError)), answers


# -- a full temporary disk ----------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the server's TMPDIR (mounting needs root, as CI and this machine
    have; elsewhere the test says so and skips)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_temp_dir_is_a_507_and_leaves_nothing(programs_home, small_tmpfs, counts_h5ad):
    import anndata as ad
    import numpy as np

    big = small_tmpfs.parent / "big.h5ad"
    source = ad.read_h5ad(counts_h5ad)
    for n_bytes, name in ((15 << 20, "spool-then-copy"), (26 << 20, "spool")):
        # incompressible filler in uns makes the file the size asked for
        source.uns["filler"] = np.random.default_rng(0).integers(0, 255, n_bytes, dtype=np.uint8)
        source.write_h5ad(big)
        with bentoml_server(programs_home, {**ENV, "TMPDIR": str(small_tmpfs)}) as srv:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                r = _upload(c, big)
                assert r.status_code == 507, f"{name}: {r.status_code} {r.text[:300]}"
                err = r.json()["error"]
                assert err["type"] == "insufficient_storage" and "TMPDIR" in err["message"]
                # a new connection: after an answer given before the body was all read, the
                # server closes this one (as after any early 413)
                assert httpx.get(f"{srv.url}/readyz").status_code == 200
            # nothing of the upload is left (BentoML keeps a few small files of its own there)
            assert list(small_tmpfs.glob(f"{UPLOAD_PREFIX}*")) == [], name
            assert shutil.disk_usage(small_tmpfs).used < 1 << 20, name
