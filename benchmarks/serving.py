"""The service vs in-process onnxruntime: cells/s and latency at 1, 64 and 1024 cells/request.

Starts a real server (``bentoml serve``, REST + gRPC, on free ports) on a model artifact
(default: ``artifacts/pbmc-programs``), then for each request size drives it with concurrent
clients (each with its own connection) for a fixed time through each door, and compares with the
model run in-process (``OnnxModel.predict`` on the same cells, one call per "request"). Doors:
the typed API (REST JSON with the top 10 genes per cell; gRPC with raw float32 bytes) and the
Open Inference Protocol (REST with the binary tensor extension; gRPC; the model's own input,
full attribution tensors back). Then the floor: the OIP REST door's own request and answer
bytes through a bare ASGI app on the same uvicorn (``benchmarks.bare_http``), which bounds what
any HTTP door could reach on this machine. Besides cells/s it prints each side's CPU per 1000
cells and the ratio by server CPU alone (what a door would reach with its clients on other
machines). Usage:

    python -m benchmarks.serving [--artifact DIR] [--sizes 1 64 1024] [--clients 8] [--seconds 10]
        [--workers N] [--split-cores]

``--split-cores`` runs the server (and in-process onnxruntime) on half the CPUs and the clients
on the other half, as when clients run elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil

from benchmarks.bare_http import bare_server
from cellexplain.api.codegen import load
from cellexplain.models.data import load_default_adata
from cellexplain.models.runtime import OnnxModel
from cellexplain.service.settings import Settings
from tests.integration.servers import bentoml_server, import_into_store

pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")


#: a client: called once in its own thread, returns the call it makes in a loop (its own
#: connection: separate clients are separate connections, which a server with several workers
#: spreads over them)
Client = Callable[[], Callable[[], object]]


def in_process(model: OnnxModel, x: np.ndarray) -> Client:
    """The model run in this process, one ``predict`` call per request."""

    def connect() -> Callable[[], object]:
        return partial(model.predict, x)

    return connect


def rest_client(url: str, path: str, body: bytes, headers: dict[str, str]) -> Client:
    def connect() -> Callable[[], object]:
        http = httpx.Client(base_url=url, timeout=120)

        def call() -> None:
            http.post(path, content=body, headers=headers).raise_for_status()

        return call

    return connect


def channel(target: str) -> grpc.Channel:
    """A channel with its own connection (grpc shares one per target within a process)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def annotate_client(target: str, req: object) -> Client:
    def connect() -> Callable[[], object]:
        return partial(pb_grpc.CellExplainStub(channel(target)).Annotate, req)

    return connect


#: the outputs the OIP doors ask for (all as binary data over REST)
OIP_OUTPUTS = ("labels", "probabilities", "attributions")


def oip_rest_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An OIP REST request for ``x`` as Triton's client encodes it (binary tensor extension):
    body and headers. The outputs asked for, all as binary data: labels, probabilities and
    attributions."""
    import tritonclient.http as thttp

    hx = thttp.InferInput("x", list(x.shape), "FP32")
    hx.set_data_from_numpy(x, binary_data=True)
    body, json_size = thttp.InferenceServerClient.generate_request_body(
        [hx], outputs=[thttp.InferRequestedOutput(o, binary_data=True) for o in OIP_OUTPUTS]
    )
    headers = {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(json_size or len(body)),
    }
    return body, headers


def oip_doors(url: str, target: str, model: str, x: np.ndarray) -> dict[str, Client]:
    """Open Inference Protocol calls: REST pre-encoded as Triton's client encodes them, gRPC
    through Triton's own client library."""
    import tritonclient.grpc as tgrpc

    gx = tgrpc.InferInput("x", list(x.shape), "FP32")
    gx.set_data_from_numpy(x)
    g_outputs = [tgrpc.InferRequestedOutput(o) for o in OIP_OUTPUTS]

    def grpc_client() -> Callable[[], object]:
        client = tgrpc.InferenceServerClient(
            target, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        return partial(client.infer, model, [gx], outputs=g_outputs)

    body, headers = oip_rest_request(x)
    return {
        "OIP REST /v2 (binary)": rest_client(url, f"/v2/models/{model}/infer", body, headers),
        "OIP gRPC ModelInfer": grpc_client,
    }


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of a process tree, or of this process when ``pid`` is None."""
    if pid is None:
        return time.process_time()
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def drive(
    connect: Client, clients: int, seconds: float, at_start: Callable[[], object] | None = None
) -> tuple[int, list[float], float]:
    """``clients`` threads, each connected once, calling in a loop for ``seconds`` (counted
    once all are connected and have made a first call; ``at_start`` runs then); (calls,
    latencies, elapsed seconds: from the start until the last call started before ``seconds``
    has returned, the time those calls took)."""
    latencies: list[float] = []
    lock = threading.Lock()
    began = [0.0]

    def start() -> None:  # run once, when every client is ready
        if at_start is not None:
            at_start()
        began[0] = time.monotonic()

    ready = threading.Barrier(clients, action=start)

    def worker() -> None:
        call = connect()
        call()  # warm-up: the connection is open
        ready.wait()
        stop = began[0] + seconds
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies, time.monotonic() - began[0]


@dataclass
class Row:
    """One door at one request size."""

    cells: int
    door: str
    clients: int
    rate: float  # cells/s
    p50: float  # ms
    p99: float  # ms
    ratio: float  # cells/s vs in-process onnxruntime's
    cpu_ms: float  # CPU-ms per 1000 cells of the side doing the work (server, or in-process)
    client_ms: float  # CPU-ms per 1000 cells of the clients beside a server
    #: in-process onnxruntime's CPU per cell over this door's server CPU per cell: the ratio the
    #: door would reach with its clients on other machines (None for the floor: no model)
    cpu_ratio: float | None

    @property
    def cpu_ratio_text(self) -> str:
        return "-" if self.cpu_ratio is None else f"{self.cpu_ratio:.2f}"


def measure(
    n: int,
    door: str,
    connect: Client,
    clients: int = 1,
    pid: int | None = None,
    base: Row | None = None,
    seconds: float = 10.0,
    runs_model: bool = True,
) -> Row:
    """Drive ``door`` with ``clients`` for ``seconds``; ``pid``: the server's process (tree),
    ``None`` for in-process calls; ``base``: the in-process row the ratios compare with."""
    before: list[float] = []  # CPU times once every client is connected and warm

    def snapshot() -> None:
        before[:] = [cpu_seconds(pid), time.process_time()]

    calls, lat, elapsed = drive(connect, clients, seconds, snapshot)
    per_1k = calls * n / 1000
    cpu_ms = (cpu_seconds(pid) - before[0]) * 1000 / per_1k
    client_ms = 0.0 if pid is None else (time.process_time() - before[1]) * 1000 / per_1k
    rate = calls * n / elapsed
    ratio = rate / base.rate if base else 1.0
    cpu_ratio = (base.cpu_ms / cpu_ms if base else 1.0) if runs_model else None
    q = np.percentile(np.asarray(lat) * 1000, [50, 99])
    row = Row(n, door, clients, rate, q[0], q[1], ratio, cpu_ms, client_ms, cpu_ratio)
    print(
        f"{n:>5} cells/request  {door:<28} {rate:>9,.0f} cells/s  p50 {q[0]:7.1f} ms  "
        f"p99 {q[1]:7.1f} ms  {ratio:5.2f}x  {cpu_ms:6.1f} CPU-ms/1k cells "
        f"(+{client_ms:.1f} clients; {row.cpu_ratio_text}x by server CPU)",
        flush=True,
    )
    return row


def http_parser() -> str:
    """The HTTP parser uvicorn's "auto" picks here (BentoML's and the floor's): httptools when
    installed, else h11."""
    import importlib.util

    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def bare_floor(
    url: str,
    model: OnnxModel,
    x: np.ndarray,
    clients: int,
    seconds: float,
    workers: int,
    tmp: Path,
    base: Row,
    cpus: set[int],
) -> Row:
    """The OIP REST door's exact request and answer bytes through a bare ASGI app on the same
    uvicorn (:mod:`benchmarks.bare_http`): what HTTP alone costs here."""
    body, headers = oip_rest_request(x)
    path = f"/v2/models/{model.card.name}/infer"
    answer = httpx.post(url + path, content=body, headers=headers, timeout=120)
    answer.raise_for_status()
    head = int(answer.headers["inference-header-content-length"])
    with bare_server(answer.content, head, workers, tmp, cpus) as (bare_url, pid):
        connect = rest_client(bare_url, path, body, headers)
        return measure(
            x.shape[0],
            "bare HTTP, no model (floor)",
            connect,
            clients,
            pid,
            base,
            seconds,
            runs_model=False,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/pbmc-programs")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument(
        "--workers", type=int, default=0, help="server workers (0, the default: one per CPU)"
    )
    p.add_argument(
        "--split-cores",
        action="store_true",
        help="server and in-process onnxruntime on the first half of this process's CPUs, the "
        "clients on the other half (clients elsewhere, as deployed; default: all share all)",
    )
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = set(cpus), set(cpus)
    if args.split_cores:
        if len(cpus) < 2:
            p.error("--split-cores needs at least 2 CPUs")
        server_cpus, client_cpus = set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])

    def place(on: set[int]) -> None:
        """Run this thread (and the threads and processes it starts from now) on ``on``."""
        os.sched_setaffinity(0, on)

    place(server_cpus)  # the model's threads and the server's processes inherit it
    workers = Settings(workers=args.workers).n_workers
    pbmc = load_default_adata()
    genes = list(pbmc.raw.var_names)
    X = np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)
    X = np.tile(X, (-(-max(args.sizes) // len(X)), 1))
    model = OnnxModel(args.artifact, intra_op_threads=len(server_cpus) if args.split_cores else 0)
    rows: list[Row] = []
    ceilings: list[str] = []
    with tempfile.TemporaryDirectory() as home:
        import_into_store(Path(args.artifact), Path(home))
        env = {"CELLEXPLAIN_MODELS": model.card.name, "CELLEXPLAIN_WORKERS": str(args.workers)}
        with bentoml_server(Path(home), env) as srv:
            for n in args.sizes:
                x = X[:n]
                # encoded once: the clients should measure the server, not their own JSON
                body = json.dumps(
                    {"genes": genes, "cells": x.tolist(), "input": "log1p_cp10k", "top_k": 10}
                ).encode()
                req = pb.AnnotateRequest(
                    genes=genes,
                    dense=pb.DenseMatrix(n_cells=n, raw_le_float32=x.astype("<f4").tobytes()),
                    options=pb.AnnotateOptions(input=pb.INPUT_LOG1P_CP10K, top_k=10),
                )
                json_headers = {"content-type": "application/json"}
                doors: dict[str, Client] = {
                    "REST /v1/annotate": rest_client(srv.url, "/v1/annotate", body, json_headers),
                    "gRPC Annotate": annotate_client(srv.grpc, req),
                    **oip_doors(srv.url, srv.grpc, model.card.name, x),
                }
                secs = args.seconds
                place(server_cpus)
                base = measure(n, "in-process onnxruntime", in_process(model, x), seconds=secs)
                rows.append(base)
                place(client_cpus)
                for door, connect in doors.items():
                    rows.append(measure(n, door, connect, args.clients, srv.proc.pid, base, secs))
                floor = bare_floor(
                    srv.url, model, x, args.clients, secs, workers, Path(home), base, server_cpus
                )
                rows.append(floor)
                best = base.cpu_ms / (base.cpu_ms + floor.cpu_ms + floor.client_ms)
                ceilings.append(
                    f"{n} cells/request: an HTTP door with the OIP door's bytes could reach at "
                    f"most {best:.2f}x here (in-process {base.cpu_ms:.1f} CPU-ms per 1k cells "
                    f"/ ({base.cpu_ms:.1f} + bare server {floor.cpu_ms:.1f} + its clients "
                    f"{floor.client_ms:.1f}))"
                )
    print(
        f"\n# serving: {model.card.name}, {args.clients} concurrent clients, "
        f"{workers} worker(s), {args.seconds:g} s per door and "
        f"size, HTTP parser {http_parser()}; "
        f"{platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| cells/request | door | clients | cells/s | p50 (ms) | p99 (ms) | vs in-process "
        "| CPU-ms per 1k cells | clients' CPU-ms per 1k cells | vs in-process, server CPU |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.cells} | {r.door} | {r.clients} | {r.rate:,.0f} | {r.p50:.1f} | {r.p99:.1f} "
            f"| {r.ratio:.2f} | {r.cpu_ms:.0f} | {r.client_ms:.0f} | {r.cpu_ratio_text} |"
        )
    print()
    for line in ceilings:
        print(f"- {line}")


if __name__ == "__main__":
    main()
