"""Offered load past capacity: the queue metric rises and falls, overload is refused at once.

    python -m load_tests.overload --url http://localhost:3000 --grpc localhost:50051 \\
        --door rest|oip-rest|grpc --cells 64 --phase-s 15 --factors 0.5,1,3 --json overload.json

First the server's capacity is measured: ``--probe-users`` clients send ``--cells``-cell
requests back to back for ``--probe-s`` seconds (cells answered per second). Then requests
arrive open-loop, as from independent clients (a fixed rate whatever the answers), at each
factor x capacity for ``--phase-s`` seconds, and then none for ``--drain-s``. Throughout,
``/metrics`` is read every ``--sample-s``: ``cellexplain_queued_cells`` summed over the
workers is the per-pod signal the autoscaling in deploy/ uses.

Each phase reports: offered and answered cells/s, refused requests (503 + ``Retry-After`` /
``RESOURCE_EXHAUSTED``), the queue (mean, max), latency of answered requests (p50, p99) and of
refusals (max), and anything else (504s, other errors). Exit code 1 when the overload SLO is
missed (:func:`check`): no answer but 200 or an overload refusal, every refusal within
``--refusal-s``, answered requests' p99 within ``--accepted-p99-s`` at every factor, the
queue higher at the top factor than at the lowest, back to 0 after the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_tests import scenario

QUEUED = re.compile(r"^cellexplain_queued_cells\{[^}]*\} (\S+)$", re.M)

#: one request's outcome: "ok", "refused", or what else came back (status or gRPC code)
Send = Callable[[], Awaitable[str]]


def queued_cells(metrics_text: str) -> float:
    """Cells queued in the whole server (the gauge summed over workers and models)."""
    return sum(float(v) for v in QUEUED.findall(metrics_text))


class QueueSampler:
    """Reads ``/metrics`` every ``interval_s`` in a thread: ``(monotonic time, queued cells)``."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url, self.interval_s = url.rstrip("/"), interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    text = client.get(f"{self.url}/metrics").text
                    self.samples.append((time.monotonic(), queued_cells(text)))
                except httpx.HTTPError:
                    pass
                self._stop.wait(self.interval_s)

    def between(self, t0: float, t1: float) -> list[float]:
        return [q for t, q in self.samples if t0 <= t < t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Phase:
    """What one phase of offered load got."""

    name: str
    offered_cells_s: float
    seconds: float
    sent: int = 0
    answered: int = 0
    refused: int = 0
    other: dict[str, int] = field(default_factory=dict)
    answered_cells_s: float = 0.0
    queue_mean: float = 0.0
    queue_max: float = 0.0
    queue_last: float = 0.0
    p50_s: float | None = None
    p99_s: float | None = None
    refusal_p99_s: float | None = None
    refusal_max_s: float | None = None


def http_sender(
    url: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """A function POSTing ``body`` to ``path`` (encoded once), and the one closing its
    connections: "ok" for a 200, "refused" for a 503 with ``Retry-After``."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    client = httpx.AsyncClient(base_url=url, timeout=120, limits=limits)

    async def send() -> str:
        r = await client.post(path, content=body, headers=headers)
        if r.status_code == 200:
            return "ok"
        if r.status_code == 503 and r.headers.get("retry-after"):
            return "refused"
        return f"HTTP {r.status_code}"

    return send, client.aclose


def rest_sender(url: str, cells: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """``cells``-cell /v1/annotate requests (JSON, the top 5 genes per cell back)."""
    genes, X = scenario.cells()
    body = scenario.rest_body(genes, X[:cells], top_k=5)
    return http_sender(url, "/v1/annotate", body, {"content-type": "application/json"})


def oip_rest_sender(url: str, cells: int, model: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """Through the Open Inference Protocol's REST door with binary tensors (as Triton's client
    encodes them): the model's own input, probabilities and attributions back."""
    from benchmarks.serving import oip_rest_request

    _, X = scenario.cells()
    body, headers = oip_rest_request(np.ascontiguousarray(X[:cells], dtype=np.float32))
    return http_sender(url, f"/v2/models/{model}/infer", body, headers)


def grpc_sender(
    target: str, cells: int, channels: int = 8
) -> tuple[Send, Callable[[], Awaitable[None]]]:
    """As :func:`rest_sender`, over the typed gRPC API: ``channels`` connections, requests
    spread over them in turn (a connection stays with one worker)."""
    import grpc

    from cellexplain.api.errors import RETRY_AFTER_KEY
    from cellexplain.client.remote import grpc_retry_delay
    from load_tests.grpc_load import pb_grpc, request

    genes, X = scenario.cells()
    req = request(genes, X[:cells])
    # distinct options: channels with equal arguments share one connection
    pool = [
        grpc.aio.insecure_channel(target, options=[("cellexplain.load", i)])
        for i in range(channels)
    ]
    stubs = [pb_grpc.CellExplainStub(ch) for ch in pool]
    turn = [0]

    async def send() -> str:
        turn[0] += 1
        try:
            await stubs[turn[0] % channels].Annotate(req, timeout=120)
            return "ok"
        except grpc.aio.AioRpcError as e:
            meta = dict(e.trailing_metadata() or ())
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and RETRY_AFTER_KEY in meta:
                return "refused"
            if grpc_retry_delay(e) is not None:  # the call limit, which the client retries
                return "refused"
            return f"{e.code().name}: {(e.details() or '')[:60]}"

    async def close() -> None:
        for ch in pool:
            await ch.close()

    return send, close


async def probe_capacity(send: Send, cells: int, users: int, seconds: float) -> float:
    """Cells per second answered with ``users`` clients sending back to back."""
    stop = time.monotonic() + seconds
    done = [0]

    async def user() -> None:
        while time.monotonic() < stop:
            if await send() == "ok":
                done[0] += 1

    t0 = time.monotonic()
    await asyncio.gather(*[user() for _ in range(users)])
    return done[0] * cells / (time.monotonic() - t0)


async def offer(send: Send, phase: Phase, cells: int) -> tuple[list[float], list[float]]:
    """Open-loop arrivals at ``phase.offered_cells_s`` for ``phase.seconds``: the latencies of
    answered requests and of refusals (every request is awaited before returning)."""
    ok: list[float] = []
    refused: list[float] = []
    tasks = []
    interval = cells / phase.offered_cells_s if phase.offered_cells_s > 0 else None

    async def one() -> None:
        t0 = time.monotonic()
        try:
            outcome = await send()
        except Exception as e:  # a transport failure is an outcome too
            outcome = type(e).__name__
        took = time.monotonic() - t0
        if outcome == "ok":
            ok.append(took)
        elif outcome == "refused":
            refused.append(took)
        else:
            phase.other[outcome] = phase.other.get(outcome, 0) + 1

    start = time.monotonic()
    if interval is not None:
        k = 0
        while (due := start + k * interval) < start + phase.seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
            k += 1
    else:
        await asyncio.sleep(phase.seconds)
    await asyncio.gather(*tasks)
    phase.sent = len(tasks)
    return ok, refused


async def run(args: argparse.Namespace) -> dict:
    cells = args.cells
    if args.door == "rest":
        send, close = rest_sender(args.url, cells)
    elif args.door == "oip-rest":
        send, close = oip_rest_sender(args.url, cells, args.model)
    else:
        send, close = grpc_sender(args.grpc, cells)
    try:
        for _ in range(3):  # warm: connections, the worker's arena
            await send()
        capacity = await probe_capacity(send, cells, args.probe_users, args.probe_s)
        await asyncio.sleep(1.0)  # the probe's queue drains
        sampler = QueueSampler(args.url, args.sample_s)
        phases: list[Phase] = []
        steps = [(f"{f:g}x", f * capacity, args.phase_s) for f in args.factors]
        for name, rate, seconds in [*steps, ("drain", 0.0, args.drain_s)]:
            phase = Phase(name, round(rate, 1), seconds)
            t0 = time.monotonic()
            ok, refused = await offer(send, phase, cells)
            t1 = time.monotonic()
            phase.answered, phase.refused = len(ok), len(refused)
            phase.answered_cells_s = round(len(ok) * cells / (t1 - t0), 1)
            queue = sampler.between(t0, t1)
            if queue:
                phase.queue_mean = round(float(np.mean(queue)), 1)
                phase.queue_max = float(max(queue))
                phase.queue_last = float(queue[-1])
            if ok:
                phase.p50_s = round(float(np.percentile(ok, 50)), 3)
                phase.p99_s = round(float(np.percentile(ok, 99)), 3)
            if refused:
                phase.refusal_p99_s = round(float(np.percentile(refused, 99)), 3)
                phase.refusal_max_s = round(max(refused), 3)
            phases.append(phase)
            print(describe(phase), flush=True)
        sampler.stop()
    finally:
        await close()
    return {
        "door": args.door,
        "cells_per_request": cells,
        "capacity_cells_s": round(capacity, 1),
        "phases": [asdict(p) for p in phases],
        "queue_samples": [(round(t - sampler.samples[0][0], 2), q) for t, q in sampler.samples],
    }


def describe(p: Phase) -> str:
    def ms(s: float | None) -> str:
        return "-" if s is None else f"{s * 1000:.0f}"

    return (
        f"{p.name:>6}: offered {p.offered_cells_s:>8.0f} cells/s, answered "
        f"{p.answered_cells_s:>8.0f}; sent {p.sent}, refused {p.refused}, other {p.other or 0}; "
        f"queue mean {p.queue_mean:.0f} max {p.queue_max:.0f} last {p.queue_last:.0f}; "
        f"answered p50/p99 {ms(p.p50_s)}/{ms(p.p99_s)} ms; refusals p99/max "
        f"{ms(p.refusal_p99_s)}/{ms(p.refusal_max_s)} ms"
    )


def check(
    result: dict, refusal_s: float, accepted_p99_s: float, refusal_max_s: float | None = None
) -> list[str]:
    """The overload SLO's violations (empty: it passed): refusals' p99 within ``refusal_s``
    and the slowest within ``refusal_max_s`` (default: ``refusal_s``)."""
    refusal_max_s = refusal_s if refusal_max_s is None else refusal_max_s
    phases = [Phase(**p) for p in result["phases"]]
    loaded, drain = phases[:-1], phases[-1]
    problems = []
    for p in phases:
        if p.other:
            problems.append(f"{p.name}: answers other than 200 or an overload refusal: {p.other}")
        if p.refusal_p99_s is not None and p.refusal_p99_s > refusal_s:
            problems.append(f"{p.name}: refusals' p99 {p.refusal_p99_s:.2f} s > {refusal_s} s")
        if p.refusal_max_s is not None and p.refusal_max_s > refusal_max_s:
            problems.append(f"{p.name}: a refusal took {p.refusal_max_s:.2f} s > {refusal_max_s} s")
        if p.p99_s is not None and p.p99_s > accepted_p99_s:
            problems.append(f"{p.name}: answered p99 {p.p99_s:.2f} s > {accepted_p99_s} s")
    if loaded[-1].queue_mean <= loaded[0].queue_mean:
        problems.append(
            f"the queue did not rise with the load: mean {loaded[0].queue_mean} at "
            f"{loaded[0].name}, {loaded[-1].queue_mean} at {loaded[-1].name}"
        )
    if drain.queue_last != 0:
        problems.append(f"the queue did not drain: {drain.queue_last} cells at the end")
    if loaded[-1].refused == 0:
        problems.append(f"nothing was refused at {loaded[-1].name}: the bound was never reached")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="REST base URL (and /metrics)")
    ap.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC target (--door grpc)")
    ap.add_argument("--door", choices=["rest", "oip-rest", "grpc"], default="rest")
    ap.add_argument("--model", default="pbmc-programs", help="the model (--door oip-rest)")
    ap.add_argument("--cells", type=int, default=64, help="cells per request")
    ap.add_argument("--factors", default="0.5,1,3", help="offered load, x measured capacity")
    ap.add_argument("--phase-s", type=float, default=15.0)
    ap.add_argument("--drain-s", type=float, default=8.0)
    ap.add_argument("--probe-s", type=float, default=10.0)
    ap.add_argument("--probe-users", type=int, default=8)
    ap.add_argument("--sample-s", type=float, default=0.5)
    ap.add_argument("--refusal-s", type=float, default=1.0, help="SLO: refusals' p99")
    ap.add_argument(
        "--refusal-max-s", type=float, help="SLO: slowest refusal (default: --refusal-s)"
    )
    ap.add_argument("--accepted-p99-s", type=float, default=10.0, help="SLO: answered p99")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    args.factors = [float(f) for f in args.factors.split(",")]
    result = asyncio.run(run(args))
    print(f"capacity {result['capacity_cells_s']:.0f} cells/s ({args.door}, {args.cells} cells)")
    problems = check(result, args.refusal_s, args.accepted_p99_s, args.refusal_max_s)
    result["slo"] = {"refusal_s": args.refusal_s, "refusal_max_s": args.refusal_max_s,
                     "accepted_p99_s": args.accepted_p99_s, "problems": problems}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print("SLO " + ("met" if not problems else "MISSED:\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
