"""The floor under any Python HTTP door: a bare ASGI app, no model, no checks, no framework.

Served by the same uvicorn (and the same HTTP parser: httptools when installed) as the service,
with the same number of worker processes, it reads each request body whole and answers with the
bytes in the file ``CELLEXPLAIN_BARE_ANSWER`` names (in the benchmark: the service's own answer to
the same request), with the headers an Open Inference Protocol binary answer carries. What it
costs per request is what receiving and sending those bytes costs here before any work is done;
``benchmarks.serving`` drives it beside the real doors and derives from it the best ratio an
HTTP door could reach on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from starlette.types import Receive, Scope, Send

from tests.integration.servers import free_port, stop_group

_ANSWER_FILE = os.environ.get("CELLEXPLAIN_BARE_ANSWER")
_ANSWER = Path(_ANSWER_FILE).read_bytes() if _ANSWER_FILE else b"{}"
_HEAD = os.environ.get("CELLEXPLAIN_BARE_HEADER_LENGTH", str(len(_ANSWER)))
_HEADERS = [
    (b"content-type", b"application/octet-stream"),
    (b"inference-header-content-length", _HEAD.encode()),
    (b"content-length", str(len(_ANSWER)).encode()),
]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the body whole (as a service must before it can parse it), answer the canned bytes."""
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    b"".join(chunks)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _ANSWER})


def serve(port: int, workers: int) -> None:
    """Listen on ``port`` and run ``workers`` uvicorn processes on the one socket, as BentoML
    does (its arbiter hands the socket to its workers): uvicorn's own ``--workers`` mode leaves
    ``TCP_NODELAY`` off, and small answers then wait ~40 ms for delayed ACKs. Accepted
    connections inherit the listening socket's ``TCP_NODELAY``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    fd = sock.fileno()
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.bare_http:app", "--fd", str(fd)]
    cmd += ["--log-level", "warning", "--no-access-log"]
    procs = [subprocess.Popen(cmd, pass_fds=(fd,)) for _ in range(workers)]

    def stop(*_: object) -> None:
        for p in procs:
            p.terminate()

    signal.signal(signal.SIGTERM, stop)
    for p in procs:
        p.wait()


@contextmanager
def bare_server(
    answer: bytes, header_length: int, workers: int, tmp: Path, cpus: set[int] | None = None
) -> Iterator[tuple[str, int]]:
    """Run :func:`app` answering ``answer`` in ``workers`` uvicorn processes (:func:`serve`) on
    ``cpus``; yields its URL and the pid of the process whose tree they are."""
    path = tmp / "bare-answer.bin"
    path.write_bytes(answer)
    port = free_port()
    env = {
        **os.environ,
        "CELLEXPLAIN_BARE_ANSWER": str(path),
        "CELLEXPLAIN_BARE_HEADER_LENGTH": str(header_length),
    }
    cmd = [sys.executable, "-m", "benchmarks.bare_http", str(port), str(workers)]

    def pin() -> None:  # its processes run on ``cpus`` (default: this thread's)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.post(url, content=b"", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare HTTP server did not start") from None
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        stop_group(proc)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
