"""Start real servers for integration tests: `bentoml serve` in a subprocess on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grpc_serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as ch:
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return bool(res.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def import_into_store(artifact: Path, home: Path, name: str | None = None) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    args = [sys.executable, "-m", "cellexplain", "models", "import", str(artifact)]
    if name:
        args += ["--name", name]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True, cwd=REPO)
    return out.stdout.strip()


@dataclass
class Server:
    url: str  # REST base URL
    grpc: str  # gRPC target host:port
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def bentoml_server(
    home: Path,
    env: dict[str, str],
    timeout: float = 120,
    graceful_flag: bool = True,
    cpus: str | None = None,
) -> Iterator[Server]:
    """Run ``bentoml serve cellexplain.service.rest:CellExplain`` (REST and gRPC on free ports), as
    ``make serve`` does (``--timeout-graceful-shutdown`` set to the shutdown grace unless
    ``graceful_flag`` is false); yields once /readyz answers 200 and gRPC health says
    SERVING. One worker process unless ``env`` sets ``CELLEXPLAIN_WORKERS`` (the tests of
    several workers do): the suite runs servers side by side on two cores. ``cpus``: the CPUs
    it may run on (``taskset -c``), as a pod's CPU limit holds it to its share."""
    port = free_port()
    grpc_port = free_port()
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "CELLEXPLAIN_GRPC_PORT": str(grpc_port),
        "CELLEXPLAIN_GRPC_HOST": "127.0.0.1",
        "CELLEXPLAIN_WORKERS": "1",
        **env,
    }
    grace = float(full_env.get("CELLEXPLAIN_SHUTDOWN_GRACE_S", "30"))
    log = open(home / f"server-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(["taskset", "-c", cpus] if cpus else []),
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "cellexplain.service.rest:CellExplain",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *(["--timeout-graceful-shutdown", str(round(grace))] if graceful_flag else []),
        ],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    grpc_on = env.get("CELLEXPLAIN_GRPC_ENABLED", "true").lower() not in ("false", "0")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = Path(log.name).read_text()[-3000:]
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
                if ready and (not grpc_on or grpc_serving(f"127.0.0.1:{grpc_port}")):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not ready after {timeout}s:\n{Path(log.name).read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield Server(url, f"127.0.0.1:{grpc_port}", proc, Path(log.name))
    finally:
        stop_group(proc)
        log.close()


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (arbiter and workers), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass  # already gone (a test stopped it)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def running_children(pid: int, marker: str) -> list[psutil.Process]:
    """The live processes under ``pid`` whose command line holds ``marker``. A child that has
    died but is not yet reaped (a zombie) or is gone already is not running: psutil refuses to
    read a zombie's command line, which made the lookup itself fail in the window between a
    kill and its reaping."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def worker_process(server: Server) -> psutil.Process:
    """The server's one worker process (servers of the tests run one)."""
    (w,) = running_children(server.proc.pid, "_bentoml_impl.worker.service")
    return w
