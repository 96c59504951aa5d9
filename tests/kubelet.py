"""What a kubelet does to a container, for tests that start ours the way a cluster would.

The rules are Kubernetes' own (``pkg/kubelet/envvars``: the Docker-link variables of every
Service in the namespace, unless the pod sets ``enableServiceLinks: false``; the API server's
``KUBERNETES_*`` always), and the translation of a rendered pod spec (command, args, env,
securityContext, resources, volumes, ports, probes) into the flags of ``podman run``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

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
