"""The service vs in-process onnxruntime: cells/s and latency at 1, 64 and 1024 cells/request.

Starts a real server (``bentoml serve``, REST + gRPC, on free ports) on a model artifact
(default: ``artifacts/pbmc-programs``), then for each request size drives it with concurrent
clients for a fixed time through each door, and compares with the model run in-process
(``OnnxModel.predict`` on the same cells, one call per "request"). Doors: the typed API (REST
JSON with the top 10 genes per cell; gRPC with raw float32 bytes) and the Open Inference Protocol
(REST with the binary tensor extension; gRPC; the model's own input, full attribution tensors
back). Usage:

    python -m benchmarks.serving [--artifact DIR] [--sizes 1 64 1024] [--clients 8] [--seconds 10]
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
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil

from cellexplain.api.codegen import load
from cellexplain.models.data import load_default_adata
from cellexplain.models.runtime import OnnxModel
from tests.integration.servers import bentoml_server, import_into_store

pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")


def post_json(http: httpx.Client, body: bytes) -> None:
    http.post(
        "/v1/annotate", content=body, headers={"content-type": "application/json"}
    ).raise_for_status()


def post_oip(http: httpx.Client, path: str, body: bytes, json_size: int) -> None:
    http.post(
        path,
        content=body,
        headers={
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(json_size),
        },
    ).raise_for_status()


def oip_doors(url: str, target: str, model: str, x: np.ndarray) -> dict[str, Callable[[], object]]:
    """Open Inference Protocol calls through Triton's own client library (pre-encoded)."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    outputs = ("labels", "probabilities", "attributions")
    hx = thttp.InferInput("x", list(x.shape), "FP32")
    hx.set_data_from_numpy(x, binary_data=True)
    body, json_size = thttp.InferenceServerClient.generate_request_body(
        [hx], outputs=[thttp.InferRequestedOutput(o, binary_data=True) for o in outputs]
    )
    http = httpx.Client(base_url=url, timeout=120)
    gx = tgrpc.InferInput("x", list(x.shape), "FP32")
    gx.set_data_from_numpy(x)
    grpc_client = tgrpc.InferenceServerClient(target)
    g_outputs = [tgrpc.InferRequestedOutput(o) for o in outputs]
    return {
        "OIP REST /v2 (binary)": partial(
            post_oip, http, f"/v2/models/{model}/infer", body, json_size or len(body)
        ),
        "OIP gRPC ModelInfer": partial(grpc_client.infer, model, [gx], outputs=g_outputs),
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


def drive(call: Callable[[], object], clients: int, seconds: float) -> tuple[int, list[float]]:
    """``clients`` threads calling ``call`` in a loop for ``seconds``; (calls, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
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
    return len(latencies), latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/pbmc-programs")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    pbmc = load_default_adata()
    genes = list(pbmc.raw.var_names)
    X = np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)
    X = np.tile(X, (-(-max(args.sizes) // len(X)), 1))
    model = OnnxModel(args.artifact)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        import_into_store(Path(args.artifact), Path(home))
        env = {"CELLEXPLAIN_MODELS": model.card.name, "CELLEXPLAIN_WORKERS": str(args.workers)}
        with bentoml_server(Path(home), env) as srv:
            http = httpx.Client(base_url=srv.url, timeout=120)
            channel = grpc.insecure_channel(srv.grpc)
            stub = pb_grpc.CellExplainStub(channel)
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
                doors: dict[str, Callable[[], object]] = {
                    "in-process onnxruntime": partial(model.predict, x),
                    "REST /v1/annotate": partial(post_json, http, body),
                    "gRPC Annotate": partial(stub.Annotate, req),
                    **oip_doors(srv.url, srv.grpc, model.card.name, x),
                }
                base = None
                for door, call in doors.items():
                    clients = 1 if door.startswith("in-process") else args.clients
                    call()  # warm-up
                    # CPU of the side doing the work: the server's processes, or this one
                    pid = None if door.startswith("in-process") else srv.proc.pid
                    cpu0 = cpu_seconds(pid)
                    calls, lat = drive(call, clients, args.seconds)
                    cpu_ms = (cpu_seconds(pid) - cpu0) * 1000 / (calls * n / 1000)
                    rate = calls * n / args.seconds
                    base = base or rate
                    q = np.percentile(np.asarray(lat) * 1000, [50, 99])
                    rows.append((n, door, clients, rate, q[0], q[1], rate / base, cpu_ms))
                    print(
                        f"{n:>5} cells/request  {door:<22} {rate:>9,.0f} cells/s  "
                        f"p50 {q[0]:7.1f} ms  p99 {q[1]:7.1f} ms  {rate / base:5.2f}x  "
                        f"{cpu_ms:6.1f} CPU-ms/1k cells",
                        flush=True,
                    )
            channel.close()
    print(
        f"\n# serving: {model.card.name}, {args.clients} concurrent clients, "
        f"{args.workers} worker(s), {args.seconds:g} s per cell; {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| cells/request | door | clients | cells/s | p50 (ms) | p99 (ms) | vs in-process "
        "| CPU-ms per 1k cells |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, door, clients, rate, p50, p99, ratio, cpu_ms in rows:
        print(
            f"| {n} | {door} | {clients} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {ratio:.2f} "
            f"| {cpu_ms:.0f} |"
        )


if __name__ == "__main__":
    main()
