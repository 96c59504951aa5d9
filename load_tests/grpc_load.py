"""gRPC load driver (ghz is not installable here): the Locust scenario's mix and SLOs over the
typed gRPC API, with asyncio clients on one channel each.

    python -m load_tests.grpc_load --target localhost:50051 --metrics-url http://localhost:3000 \\
        --users 16 --duration 300 --csv load_tests/results/grpc.csv

Exit code 1 when an SLO is missed (see ``load_tests/scenario.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellexplain.api.codegen import load
from load_tests import scenario

pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")


def request(genes: list[str], X: np.ndarray, model: str | None = None) -> object:
    return pb.AnnotateRequest(
        genes=genes,
        dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
        options=pb.AnnotateOptions(model=model or "", input=pb.INPUT_LOG1P_CP10K, top_k=10),
    )


async def run(args: argparse.Namespace) -> int:
    slo = scenario.Slo.from_env()
    genes, X = scenario.cells()
    valid_reqs = {n: request(genes, X[:n]) for n in scenario.SIZES}
    bad_reqs = [
        (b, request(b.genes, b.cells, b.model))
        for b in scenario.bad_requests(genes, X)
        if not b.ragged  # a dense protobuf matrix cannot be ragged
    ]
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    stop = time.monotonic() + args.duration
    memory: dict[str, float | None] = {}

    async def user() -> None:
        async with grpc.aio.insecure_channel(args.target) as channel:
            stub = pb_grpc.CellExplainStub(channel)
            while time.monotonic() < stop:
                if random.random() < scenario.BAD_SHARE:
                    bad, req = random.choice(bad_reqs)
                    name = f"bad: {bad.name}"
                    t0 = time.perf_counter()
                    try:
                        await stub.Annotate(req, timeout=60)
                        failures[name] += 1  # accepted: wrong
                    except grpc.aio.AioRpcError as e:
                        if e.code().name != bad.code:
                            failures[name] += 1
                else:
                    n = random.choices(list(scenario.SIZES), weights=list(scenario.SIZES.values()))[
                        0
                    ]
                    name = f"annotate {n} cells" if n > 1 else "annotate 1 cell"
                    t0 = time.perf_counter()
                    try:
                        res = await stub.Annotate(valid_reqs[n], timeout=60)
                        if len(res.cells) != n:
                            failures[name] += 1
                    except grpc.aio.AioRpcError:
                        failures[name] += 1
                latencies[name].append(time.perf_counter() - t0)

    sampler = (
        scenario.MemorySampler(args.metrics_url, min(slo.warmup_s, args.duration / 4))
        if args.metrics_url
        else None
    )
    await asyncio.gather(*(user() for _ in range(args.users)))
    if sampler is not None:
        memory["start"], memory["end"] = sampler.stop()

    rows = []
    p99: dict[int, float] = {}
    valid = valid_failed = bad_unexpected = 0
    for name in sorted(latencies):
        lat = np.asarray(latencies[name]) * 1000
        q50, q99 = np.percentile(lat, [50, 99])
        rows.append((name, len(lat), failures[name], q50, q99, len(lat) / args.duration))
        n = scenario.size_of(name)
        if n is None:
            bad_unexpected += failures[name]
        else:
            p99[n] = float(q99)
            valid += len(lat)
            valid_failed += failures[name]
    print(f"{'request':<28}{'count':>8}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>9}")
    for name, count, failed, q50, q99, rps in rows:
        print(f"{name:<28}{count:>8}{failed:>8}{q50:>10.1f}{q99:>10.1f}{rps:>9.1f}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["request", "count", "failed", "p50_ms", "p99_ms", "requests_per_s"])
            w.writerows(rows)
    if not args.metrics_url:  # memory SLO needs the server's /metrics
        memory = {"start": 0.0, "end": 0.0}
    problems = scenario.check_slo(
        slo, p99, valid, valid_failed, bad_unexpected, memory.get("start"), memory.get("end")
    )
    samples = f" (samples {sampler.describe()})" if sampler is not None else ""
    print(f"memory {memory.get('start')} -> {memory.get('end')} MB{samples}")
    if problems:
        print("SLO MISSED:\n  " + "\n  ".join(problems))
        return 1
    print("SLO met")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="gRPC host:port")
    p.add_argument(
        "--metrics-url", default=None, help="the server's REST base URL, for /metrics (memory)"
    )
    p.add_argument("--users", type=int, default=16, help="concurrent clients")
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--csv", default=None, help="write per-request-type results here")
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
