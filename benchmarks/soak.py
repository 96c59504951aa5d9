"""The load-test soak as a benchmark: a real server, then Locust (REST) and the gRPC driver for
``--duration`` seconds each with the scenario of ``load_tests/``, as one Markdown table.

    python -m benchmarks.soak [--artifact DIR] [--duration 300] [--users 16]

Exit code 1 when either run missed an SLO (the table is printed either way).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.servers import REPO, bentoml_server, import_into_store


def _int(v: str) -> str:
    return f"{round(float(v)):,}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/pbmc-programs")
    p.add_argument("--duration", type=int, default=300, help="seconds per door")
    p.add_argument("--users", type=int, default=16)
    args = p.parse_args()
    env = {**os.environ, "LOAD_WARMUP_S": str(min(10, args.duration // 4))}
    with tempfile.TemporaryDirectory() as tmp:
        home, out = Path(tmp) / "home", Path(tmp) / "out"
        home.mkdir()
        out.mkdir()
        import_into_store(Path(args.artifact), home)
        with bentoml_server(home, {"CELLEXPLAIN_WORKERS": "1"}) as srv:
            rest = subprocess.run(
                [
                    *(sys.executable, "-m", "locust", "-f", "load_tests/locustfile.py"),
                    *("--headless", "--only-summary", "--host", srv.url, "-r", "4"),
                    *("-u", str(args.users), "-t", f"{args.duration}s", "--csv", str(out / "rest")),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            grpc = subprocess.run(
                [
                    *(sys.executable, "-m", "load_tests.grpc_load", "--target", srv.grpc),
                    *("--metrics-url", srv.url, "--users", str(args.users)),
                    *("--duration", str(args.duration), "--csv", str(out / "grpc.csv")),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
        rows = []
        with open(out / "rest_stats.csv") as f:
            for r in csv.DictReader(f):
                if r["Name"] != "Aggregated":
                    rows.append(("REST (Locust)", r["Name"], r["Request Count"],
                                 r["Failure Count"], r["50%"], r["99%"]))  # fmt: skip
        with open(out / "grpc.csv") as f:
            for r in csv.DictReader(f):
                rows.append(("gRPC (driver)", r["request"], r["count"], r["failed"],
                             r["p50_ms"], r["p99_ms"]))  # fmt: skip
    mem_rest = re.search(r"memory ([\d.]+) -> ([\d.]+) MB", rest.stderr)
    mem_grpc = re.search(r"memory ([\d.]+) -> ([\d.]+) MB", grpc.stdout)
    print(
        f"# soak: {args.users} users, {args.duration} s per door, 1 worker; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("| door | request | count | failed | p50 (ms) | p99 (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for door, name, count, failed, p50, p99 in rows:
        print(f"| {door} | {name} | {_int(count)} | {failed} | {_int(p50)} | {_int(p99)} |")
    for door, m, proc in (("REST", mem_rest, rest), ("gRPC", mem_grpc, grpc)):
        verdict = "SLO met" if proc.returncode == 0 else "SLO MISSED"
        memory = f"{float(m[1]):.0f} -> {float(m[2]):.0f} MB" if m else "not sampled"
        print(f"# {door}: {verdict}; worker memory (first vs last third) {memory}")
        if proc.returncode != 0:
            print((proc.stderr + proc.stdout)[-1500:], file=sys.stderr)
    sys.exit(1 if rest.returncode or grpc.returncode else 0)


if __name__ == "__main__":
    main()
