"""What a kubelet does to a container, for tests that start ours the way a cluster would.

The rules are Kubernetes' own (``pkg/kubelet/envvars``: the Docker-link variables of every
Service in the namespace, unless the pod sets ``enableServiceLinks: false``; the API server's
``KUBERNETES_*`` always), and the translation of a rendered pod spec (command, args, env,
securityContext, resources, volumes, ports, probes) into the flags of ``podman run``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: the API server's Service, which every pod gets links to whatever it sets
KUBERNETES_SERVICE = {
    "metadata": {"name": "kubernetes"},
    "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]},
}


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_")


def service_link_env(services: Iterable[dict[str, Any]], first_ip: int = 10) -> dict[str, str]:
    """The variables a kubelet gives a pod for ``services`` (Service objects; headless ones
    get none): ``NAME_SERVICE_HOST``, ``NAME_SERVICE_PORT[_PORTNAME]``, ``NAME_PORT`` and
    ``NAME_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]``. Services without a ``clusterIP`` are given
    ``10.96.0.<first_ip + i>``."""
    env: dict[str, str] = {}
    for i, svc in enumerate(services):
        spec = svc["spec"]
        ip = spec.get("clusterIP") or f"10.96.0.{first_ip + i}"
        if ip == "None":
            continue
        prefix = _env_name(svc["metadata"]["name"])
        ports = spec.get("ports", [])
        env[f"{prefix}_SERVICE_HOST"] = ip
        if ports:
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for j, p in enumerate(ports):
            if p.get("name"):
                env[f"{prefix}_SERVICE_PORT_{_env_name(p['name'])}"] = str(p["port"])
            proto = p.get("protocol", "TCP")
            url = f"{proto.lower()}://{ip}:{p['port']}"
            if j == 0:
                env[f"{prefix}_PORT"] = url
            link = f"{prefix}_PORT_{p['port']}_{proto.upper()}"
            env[link] = url
            env[f"{link}_PROTO"] = proto.lower()
            env[f"{link}_PORT"] = str(p["port"])
            env[f"{link}_ADDR"] = ip
    return env


def pod_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
    services: list[dict[str, Any]],
    force_service_links: bool = False,
) -> dict[str, str]:
    """The environment a kubelet builds for ``container``: Service links (unless the pod
    turns them off; ``force_service_links`` gives them anyway, as a pod without the flag would
    get), then ``envFrom`` in order, then ``env``. Secrets are given as plain strings."""
    env: dict[str, str] = {}
    links = [KUBERNETES_SERVICE]
    if pod.get("enableServiceLinks", True) or force_service_links:
        links += services
    env.update(service_link_env(links))
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = config_maps.get(ref["name"])
        else:
            ref = source["secretRef"]
            data = secrets.get(ref["name"])
        if data is None:
            assert ref.get("optional"), f"{ref['name']} is required and missing"
            continue
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = config_maps[ref["name"]][ref["key"]]
    return env


#: what KServe's controller names and mounts (pkg/constants): the storage initializer's volume
KSERVE_MODEL_VOLUME = "kserve-provision-location"
KSERVE_MODEL_PATH = "/mnt/models"


def _kserve_placeholders(obj: Any, meta: dict[str, Any]) -> Any:
    """``{{.Name}}``, ``{{.Namespace}}``, ``{{.Labels.k}}``, ``{{.Annotations.k}}`` filled from
    ``meta`` (KServe executes the container's JSON as a Go template on the object's metadata);
    any other placeholder is an error, as the template would fail."""
    fields = {"Name": meta["name"], "Namespace": meta.get("namespace", "default")}

    def fill(m: re.Match[str]) -> str:
        path = m.group(1).split(".")
        if len(path) == 1 and path[0] in fields:
            return fields[path[0]]
        if len(path) == 2 and path[0] in ("Labels", "Annotations"):
            return meta.get(path[0].lower(), {}).get(path[1], "")
        raise AssertionError(f"KServe cannot fill {m.group(0)}")

    return json.loads(re.sub(r"\{\{\s*\.([A-Za-z.]+)\s*\}\}", fill, json.dumps(obj)))


def kserve_predictor(
    runtime: dict[str, Any], isvc: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(pod spec, container, Service)`` that KServe's controller makes for ``isvc``'s
    predictor on ``runtime`` (a ServingRuntime), in RawDeployment mode: the runtime's first
    container merged with the predictor's ``model`` fields (``env`` by name and ``resources``
    replaced by the predictor's, ``args`` appended to the runtime's, as
    ``MergeRuntimeContainers``), its placeholders filled from the InferenceService's metadata,
    the runtime's volumes plus the storage initializer's emptyDir, mounted read-only at
    ``/mnt/models``; and the predictor Service ``NAME-predictor``: the first container port as
    port 80, the others as they are (``h2c``/``grpc`` ones with ``appProtocol
    kubernetes.io/h2c``)."""
    meta = isvc["metadata"]
    (base, *_) = runtime["spec"]["containers"]
    model = isvc["spec"]["predictor"]["model"]
    container = copy.deepcopy(base)
    env = {e["name"]: e for e in container.get("env", [])}
    env.update({e["name"]: e for e in model.get("env", [])})
    container["env"] = list(env.values())
    if "resources" in model:
        container["resources"] = model["resources"]
    container["args"] = [*base.get("args", []), *model.get("args", [])]
    container = _kserve_placeholders(container, meta)
    container.setdefault("volumeMounts", []).append(
        {"name": KSERVE_MODEL_VOLUME, "mountPath": KSERVE_MODEL_PATH, "readOnly": True}
    )
    pod = {
        "containers": [container],
        "volumes": [
            *runtime["spec"].get("volumes", []),
            {"name": KSERVE_MODEL_VOLUME, "emptyDir": {}},
        ],
    }
    ports = []
    for i, p in enumerate(container.get("ports", [])):
        port = {"name": p["name"], "port": 80 if i == 0 else p["containerPort"],
                "targetPort": p["containerPort"], "protocol": p.get("protocol", "TCP")}  # fmt: skip
        if "h2c" in p["name"] or "grpc" in p["name"]:
            port["appProtocol"] = "kubernetes.io/h2c"
        ports.append(port)
    service = {"metadata": {"name": f"{meta['name']}-predictor"}, "spec": {"ports": ports}}
    return pod, container, service


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's values, decoded (``data`` is base64, ``stringData`` plain)."""
    out = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    out.update(secret.get("stringData", {}))
    return out


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity (``4Gi``, ``512Mi``, ``1G``, ``1024``) in bytes."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12}
    for suffix in sorted(units, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * units[suffix])
    return int(float(s))


def cpu_quantity(q: str | int | float) -> float:
    """A CPU quantity (``2``, ``500m``) in CPUs."""
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


# -- a container started from a pod spec, with podman ----------------------------------------
def podman_base() -> list[str]:
    """``podman`` with the runc runtime where installed (crun refuses some cgroup setups)."""
    runc = shutil.which("runc")
    return ["podman", *(["--runtime", runc] if runc else [])]


def _ulimits() -> list[str]:
    """Explicit limits: podman's defaults are not permitted on every host."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if hard in (resource.RLIM_INFINITY,) or hard > 65536 else hard
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


@dataclass
class ProbeResult:
    at: float  # time.monotonic()
    kind: str  # startup | readiness | liveness
    ok: bool
    detail: str


@dataclass
class PodContainer:
    """One container of a rendered pod spec, run by podman as a kubelet would run it:
    command and args, the environment it builds, the pod's user, read-only root, dropped
    capabilities, no privilege escalation, CPU and memory limits, ``emptyDir`` volumes (on disk
    like a kubelet's, a folder of ``workdir``; ``medium: Memory`` ones as tmpfs of their
    ``sizeLimit``), every container port published on 127.0.0.1, and the probes polled with
    their paths, ports, periods, timeouts and thresholds. The kubelet evicts a pod whose
    ``emptyDir`` outgrows its ``sizeLimit``: :attr:`volume_peak` records each disk volume's
    largest use seen while watching, for a test to hold against the limit."""

    image: str
    pod: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    workdir: Path
    name: str = field(default_factory=lambda: f"cellexplain-pod-{os.getpid()}-{time.time_ns()}")
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> host port
    probes: list[ProbeResult] = field(default_factory=list)
    volume_dirs: dict[str, Path] = field(default_factory=dict)  # disk emptyDirs: host folders
    #: disk emptyDirs filled before the container starts, as an init container fills them
    #: (KServe's storage initializer: the model folder): volume name -> folder copied in
    prefill: dict[str, Path] = field(default_factory=dict)
    volume_peak: dict[str, int] = field(default_factory=dict)  # bytes, largest use seen
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- the command --------------------------------------------------------------------
    def run_args(self) -> list[str]:
        pod_sc = self.pod.get("securityContext", {})
        sc = self.container.get("securityContext", {})
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            assert uid not in (None, 0), "runAsNonRoot without a non-root runAsUser"
        args = ["run", "--detach", "--name", self.name, *_ulimits()]
        if uid is not None:
            args += ["--user", f"{uid}:{gid}"]
        if "fsGroup" in pod_sc:
            args += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            # no tmpfs on /tmp, /run of podman's own: only the pod's volumes are writable
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        limits = self.container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            args += ["--cpus", str(cpu_quantity(limits["cpu"]))]
        if "memory" in limits:
            args += ["--memory", str(quantity_bytes(limits["memory"]))]
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            vol = volumes[mount["name"]]
            assert "emptyDir" in vol, f"only emptyDir volumes are run here: {vol}"
            empty = vol["emptyDir"] or {}
            size = empty.get("sizeLimit")
            if empty.get("medium") == "Memory":
                opts = f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777"
                args += ["--mount", opts + (f",tmpfs-size={quantity_bytes(size)}" if size else "")]
            else:
                host = self.workdir / f"{self.name}-{vol['name']}"
                if vol["name"] in self.prefill:
                    shutil.copytree(self.prefill[vol["name"]], host)
                    for f in (host, *host.rglob("*")):
                        f.chmod(0o755 if f.is_dir() else 0o644)
                else:
                    host.mkdir(mode=0o777)
                    host.chmod(0o1777)
                self.volume_dirs[vol["name"]] = host
                bind = f"type=bind,source={host},destination={mount['mountPath']}"
                args += ["--mount", bind + (",readonly=true" if mount.get("readOnly") else "")]
        for p in self.container.get("ports", []):
            inside = p["containerPort"]
            self.ports[inside] = _free_port()
            args += ["--publish", f"127.0.0.1:{self.ports[inside]}:{inside}"]
        env_file = self.workdir / f"{self.name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        env_file.chmod(0o600)
        args += ["--env-file", str(env_file)]
        if "command" in self.container:
            args += ["--entrypoint", json.dumps(self.container["command"])]
        return [*args, self.image, *self.container.get("args", [])]

    def start(self) -> None:
        out = subprocess.run(
            [*podman_base(), *self.run_args()], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]

    # -- probes -------------------------------------------------------------------------
    def port(self, ref: int | str) -> int:
        """The host port of a container port given by number or by name."""
        if isinstance(ref, str):
            ref = next(p["containerPort"] for p in self.container["ports"] if p["name"] == ref)
        return self.ports[ref]

    def probe_once(self, kind: str) -> ProbeResult:
        spec = self.container[f"{kind}Probe"]
        timeout = spec.get("timeoutSeconds", 1)
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                url = f"http://127.0.0.1:{self.port(get['port'])}{get.get('path', '/')}"
                code = httpx.get(url, timeout=timeout).status_code
                ok, detail = 200 <= code < 400, str(code)
            elif "grpc" in spec:
                ok, detail = _grpc_health(f"127.0.0.1:{self.port(spec['grpc']['port'])}", timeout)
            else:
                raise AssertionError(f"probe kind not run here: {spec}")
        except (httpx.HTTPError, OSError) as e:
            ok, detail = False, type(e).__name__
        result = ProbeResult(time.monotonic(), kind, ok, detail)
        self.probes.append(result)
        return result

    def wait_started(self) -> float:
        """Poll the startup probe as the kubelet does (first after ``initialDelaySeconds``,
        then every ``periodSeconds``, giving up after ``failureThreshold`` failures); returns the
        seconds until it passed."""
        spec = self.container["startupProbe"]
        t0 = time.monotonic()
        time.sleep(spec.get("initialDelaySeconds", 0))
        for _ in range(spec.get("failureThreshold", 3)):
            if self.probe_once("startup").ok:
                return time.monotonic() - t0
            assert self.state() == "running", f"container exited:\n{self.logs()[-4000:]}"
            time.sleep(spec.get("periodSeconds", 10))
        raise AssertionError(f"startup probe never passed:\n{self.logs()[-4000:]}")

    def watch(self) -> None:
        """Poll readiness and liveness in the background, each at its own period."""
        self._stop.clear()

        def run() -> None:
            due = {"readiness": 0.0, "liveness": 0.0}
            while not self._stop.is_set():
                now = time.monotonic()
                for kind, at in due.items():
                    if now >= at:
                        self.probe_once(kind)
                        due[kind] = now + self.container[f"{kind}Probe"].get("periodSeconds", 10)
                self.measure_volumes()
                self._stop.wait(0.1)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def measure_volumes(self) -> None:
        """Record each disk volume's use (allocated blocks) if it is the largest yet."""
        for name, host in self.volume_dirs.items():
            used = 0
            for root, _, files in os.walk(host):
                for f in files:
                    with contextlib.suppress(OSError):  # removed meanwhile
                        used += os.lstat(os.path.join(root, f)).st_blocks * 512
            self.volume_peak[name] = max(self.volume_peak.get(name, 0), used)

    def unwatch(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def failed_in_a_row(self, kind: str, since: float) -> int:
        """The longest run of consecutive failures of ``kind`` probes after ``since``."""
        best = run = 0
        for r in self.probes:
            if r.kind == kind and r.at >= since:
                run = 0 if r.ok else run + 1
                best = max(best, run)
        return best

    # -- the container ------------------------------------------------------------------
    def podman(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*podman_base(), *args], capture_output=True, text=True, timeout=timeout
        )

    def state(self) -> str:
        return self.podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()

    def exit_code(self) -> int:
        out = self.podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(out.strip())

    def logs(self) -> str:
        out = self.podman("logs", self.name)
        return out.stdout + out.stderr

    def exec_python(self, code: str) -> str:
        out = self.podman("exec", self.name, "python3", "-c", code)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def terminate(self, before_sigterm: Callable[[], None] | None = None) -> tuple[float, float]:
        """The kubelet's way out: the ``preStop`` hook (a sleep here), then SIGTERM, then
        SIGKILL at ``terminationGracePeriodSeconds`` from the start; returns (seconds from the
        start to the exit, from SIGTERM to the exit). ``before_sigterm`` runs between the hook
        and the signal."""
        grace = self.pod.get("terminationGracePeriodSeconds", 30)
        t0 = time.monotonic()
        pre_stop = self.container.get("lifecycle", {}).get("preStop", {})
        time.sleep(pre_stop.get("sleep", {}).get("seconds", 0))
        if before_sigterm is not None:
            before_sigterm()
        sigterm = time.monotonic()
        assert self.podman("kill", "--signal", "TERM", self.name).returncode == 0
        while self.state() == "running":
            if time.monotonic() - t0 > grace:
                self.podman("kill", "--signal", "KILL", self.name)
                break
            time.sleep(0.2)
        end = time.monotonic()
        return end - t0, end - sigterm

    def remove(self) -> None:
        self.unwatch()
        self.podman("rm", "--force", "--time", "0", self.name)
        for host in self.volume_dirs.values():
            shutil.rmtree(host, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _grpc_health(target: str, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as ch:
            res = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        return res.status == health_pb2.HealthCheckResponse.SERVING, str(res.status)
    except grpc.RpcError as e:
        return False, str(e.code())
