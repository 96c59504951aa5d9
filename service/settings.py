"""One settings object, read from ``CELLEXPLAIN_*`` environment variables.

Every knob of the service is here, with its default and its variable name; nothing else in the
service reads the environment.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "CELLEXPLAIN_"
#: variables for clients (``cellexplain annotate``), not for the service
CLIENT_PREFIX = "CELLEXPLAIN_CLIENT_"
#: most worker processes started when their number is left to the machine (each holds a copy
#: of every model and ~400 MB)
MAX_AUTO_WORKERS = 4
#: cgroup v2 and v1 CPU quota files (a container's CPU limit)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(
    cpu_max: Path = CGROUP_CPU_MAX,
    v1_quota: Path = CGROUP_V1_QUOTA,
    v1_period: Path = CGROUP_V1_PERIOD,
) -> float | None:
    """The container's CPU limit in CPUs (a Kubernetes ``limits.cpu``), or ``None`` if it has
    none or the files cannot be read."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max" or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q, p = int(v1_quota.read_text()), int(v1_period.read_text())
        return None if q <= 0 or p <= 0 else q / p
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, bounded by the container's CPU limit
    (rounded up). ``os.cpu_count()`` counts the node's cores, which in a pod limited to 2 CPUs
    on a 64-core node would start 64 onnxruntime threads per worker."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


log = logging.getLogger(__name__)

#: the variables a kubelet gives a pod for each Service of its namespace (Docker links: a
#: Service ``cellexplain`` or ``cellexplain-x`` gives ``CELLEXPLAIN_SERVICE_HOST``,
#: ``CELLEXPLAIN_PORT_3000_TCP_PROTO``, ``CELLEXPLAIN_X_SERVICE_PORT_HTTP``, ...), by the form of
#: their names and of their values (a name alone would let typos such as
#: ``CELLEXPLAIN_GRCP_PORT=50052`` pass: a link's ``X_PORT`` is always ``proto://ip:port``)
_IP = r"[0-9A-Fa-f.:\[\]]+"
#: (name form, value form, whether a setting of that name yields to it): only a link's
#: ``proto://ip:port`` outranks a setting (``HTTP_PORT``, from a Service ``cellexplain-http``)
SERVICE_LINK_FORMS = [
    (re.compile(r"(?:[A-Z0-9_]+_)?SERVICE_HOST"), re.compile(_IP), False),
    (re.compile(r"(?:[A-Z0-9_]+_)?SERVICE_PORT(?:_[A-Z0-9_]+)?"), re.compile(r"\d+"), False),
    (
        re.compile(r"(?:[A-Z0-9_]+_)?PORT(?:_\d+_(?:TCP|UDP|SCTP))?"),
        re.compile(r"(?:tcp|udp|sctp)://" + _IP + r":\d+"),
        True,
    ),
    (
        re.compile(r"(?:[A-Z0-9_]+_)?PORT_\d+_(?:TCP|UDP|SCTP)_PROTO"),
        re.compile(r"tcp|udp|sctp"),
        False,
    ),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT_\d+_(?:TCP|UDP|SCTP)_PORT"), re.compile(r"\d+"), False),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT_\d+_(?:TCP|UDP|SCTP)_ADDR"), re.compile(_IP), False),
]


def is_service_link(name: str, value: str, settings: frozenset[str] | set[str]) -> bool:
    """Whether ``CELLEXPLAIN_`` + ``name`` (upper case, prefix removed) = ``value`` is a variable
    the kubelet injected for a Service rather than a setting: a name and a value of one of the
    link forms, where a setting of that name only yields to a form that outranks settings."""
    for name_re, value_re, outranks in SERVICE_LINK_FORMS:
        if name_re.fullmatch(name) and value_re.fullmatch(value):
            return outranks or name.lower() not in settings
    return False


#: batches a worker queues per model before it refuses work, unless ``max_queued_cells`` says
QUEUED_BATCHES = 32


class SettingsError(ValueError):
    """A ``CELLEXPLAIN_*`` variable is unknown or its value is not valid; the message names
    the variable."""


class Settings(BaseModel):
    """Service settings. Each field ``foo_bar`` is read from ``CELLEXPLAIN_FOO_BAR``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    models: list[str] = Field(
        default_factory=lambda: ["pbmc-programs"],
        description="BentoML store tags to serve (comma-separated in the environment)",
    )
    model_dirs: list[str] = Field(
        default_factory=list,
        description="artifact folders (model.onnx + model.json) to serve besides the store",
    )
    default_model: str | None = Field(
        default=None, description="model used when a request names none (default: the first)"
    )
    model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the name the one served model answers to, in place of its card's name "
        "(KServe: the InferenceService's name, passed as {{.Name}}); needs exactly one model",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="if set (comma-separated, from a Secret), REST /v1 /v2 and gRPC calls need "
        "'Authorization: Bearer KEY' or 'X-API-Key: KEY'; health and metrics stay open",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="log lines as BentoML writes them, or one JSON object per line with the "
        "request id and model (the image's manifests set json)",
    )
    http_port: int = Field(default=3000, ge=1, le=65535)
    grpc_enabled: bool = Field(default=True, description="serve gRPC beside REST")
    grpc_host: str = "[::]"
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    workers: int = Field(
        default=0,
        ge=0,
        description="worker processes; 0: one per usable CPU (the affinity mask and the "
        f"container's CPU limit), at most {MAX_AUTO_WORKERS}, or one on a GPU",
    )
    max_cells_per_request: int = Field(default=10_000, ge=1)
    max_genes_per_request: int = Field(default=60_000, ge=1)
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="JSON body and gRPC request message limit; a request's peak worker memory "
        "stays under 20x this (docs/security.md); answers are bounded by the cell limit",
    )
    max_h5ad_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="upload limit, applied both to the bytes sent and to what the file "
        "declares once decompressed",
    )
    upload_memory_bytes: int = Field(
        default=2 * 1024**3,
        ge=64 * 1024**2,
        description="address space the process reading one .h5ad upload may add to its own "
        "at start (413 beyond it); uploads are read in a child process (docs/security.md)",
    )
    upload_cpu_s: float = Field(
        default=60.0, gt=0, description="CPU seconds the process reading one upload may use (422)"
    )
    upload_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds the process reading one upload may take to read it, and again to "
        "write the annotated file (422 beyond either; the process is killed)",
    )
    max_concurrent_uploads: int = Field(
        default=1,
        ge=1,
        description="uploads read at once per worker (each in its own process); more wait",
    )
    max_inflight_bytes: int = Field(
        default=0,
        ge=0,
        description="request bodies a worker holds at once (declared sizes, uploads aside: they "
        "go to disk); beyond it 503 with Retry-After, a request alone always admitted; 0: twice "
        "max_body_bytes",
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection's request head must arrive within this, from the connection's "
        "start or the head's first byte; else the connection is closed",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="longest pause between two pieces of a request body; then 408",
    )
    http_body_min_rate: int = Field(
        default=16384,
        ge=0,
        description="bytes per second a request body must average over each "
        "http_body_timeout_s while it arrives; below it 408 (a body trickled after a large "
        "first piece held its bytes of the in-flight budget indefinitely); 0: no minimum",
    )
    max_batch_cells: int = Field(
        default=1024, ge=1, description="cells per onnxruntime call; larger requests are chunked"
    )
    max_queued_cells: int = Field(
        default=0,
        ge=0,
        description="cells a worker queues for one model before it refuses new requests at "
        "once (503 with Retry-After, gRPC RESOURCE_EXHAUSTED) instead of letting them time "
        "out; a request alone is always admitted. 0: 32 x max_batch_cells (cells count from "
        "arrival, while they are prepared too: a few of the largest requests must fit)",
    )
    grpc_max_concurrent_rpcs: int = Field(
        default=256,
        ge=1,
        description="gRPC calls a worker runs at once; beyond it a call is refused with "
        "RESOURCE_EXHAUSTED before its message is read (bounds the messages a worker holds "
        "under overload; the queue bound refuses first for requests of 64+ cells)",
    )
    max_waiting_parses: int = Field(
        default=4,
        ge=0,
        description="large request bodies and unary gRPC messages (1 MiB+) a worker lets wait "
        "for its parser (one parses at a time per door); beyond it 503 with Retry-After or "
        "RESOURCE_EXHAUSTED at once (0: no bound)",
    )
    max_batch_latency_ms: float = Field(
        default=5.0, ge=0, description="how long a batch waits for more requests to merge"
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="longest a request may wait for and run inference; beyond it HTTP 504 / "
        "DEADLINE_EXCEEDED (the cells it queued are dropped from their batch)",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="after SIGTERM, how long in-flight gRPC calls may run on (in-flight HTTP "
        "requests always finish; keep terminationGracePeriodSeconds above both)",
    )
    malloc_trim_s: float = Field(
        default=1.0,
        ge=0,
        description="how often a worker gives its C heap's free pages back to the system "
        "(0: never; docs/benchmarks.md section 3)",
    )
    max_top_k: int = Field(default=100, ge=1)
    missing_genes_listed: int = Field(default=20, ge=0)
    intra_op_threads: int = Field(
        default=0, ge=0, description="onnxruntime threads per worker; 0: the usable CPUs / workers"
    )
    ort_spinning: bool = Field(
        default=False,
        description="let onnxruntime's idle threads spin-wait for work (lower latency on "
        "dedicated cores; off: a server shares its cores with request handling)",
    )
    prefer_gpu: bool = True
    tensorrt: bool = Field(
        default=False,
        description="try onnxruntime's TensorRT provider first (when installed), engines cached",
    )
    trt_cache_dir: str = Field(
        default="", description="TensorRT engine cache (default: $TMPDIR/cellexplain-trt)"
    )

    @property
    def n_workers(self) -> int:
        """Worker processes to start: ``workers``, or one per usable CPU; one when the models
        run on a GPU (one process feeds it; its batcher merges every request)."""
        if self.workers:
            return self.workers
        return 1 if self.uses_gpu else min(usable_cpus(), MAX_AUTO_WORKERS)

    @property
    def queue_bound(self) -> int:
        """Cells a worker queues per model (``max_queued_cells``, or 32 batches: about 1.5 s of
        work for one CPU with the default model)."""
        return self.max_queued_cells or QUEUED_BATCHES * self.max_batch_cells

    @property
    def inflight_bytes(self) -> int:
        """Bytes of request bodies a worker admits at once (``max_inflight_bytes``, or twice
        the body limit)."""
        return self.max_inflight_bytes or 2 * self.max_body_bytes

    @property
    def uses_gpu(self) -> bool:
        """Whether onnxruntime will run the models on a GPU (CUDA or TensorRT provider)."""
        from cellexplain.models.runtime import available_providers, provider_name

        first = available_providers(self.prefer_gpu, self.tensorrt, self.trt_cache_dir or None)[0]
        return provider_name(first) != "CPUExecutionProvider"

    @property
    def onnxruntime_threads(self) -> int:
        """onnxruntime threads per worker: ``intra_op_threads``, or the usable CPUs shared
        among the workers (not oversubscribed)."""
        return self.intra_op_threads or max(1, usable_cpus() // self.n_workers)

    @field_validator("models", "model_dirs", "api_keys", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _some_key(cls, v: object) -> object:
        """An empty Secret must not turn authentication off unnoticed (unset: no keys)."""
        if isinstance(v, str) and not v.replace(",", "").strip():
            raise ValueError("set but holds no key; unset it to serve without keys")
        return v

    @field_validator("malloc_trim_s")
    @classmethod
    def _trim_period(cls, v: float) -> float:
        if 0 < v < 0.1:
            raise ValueError("must be 0 (never) or at least 0.1 s (trimming costs a few ms)")
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``CELLEXPLAIN_*`` variables; unknown ones are an error (typos), except
        the Service links a kubelet injects (:func:`is_service_link`), which are skipped."""
        env = os.environ if environ is None else environ
        values: dict[str, str] = {}
        problems: list[str] = []
        fields = set(cls.model_fields)
        links = []
        for key, value in env.items():
            if key.startswith(ENV_PREFIX) and not key.startswith(CLIENT_PREFIX):
                name = key[len(ENV_PREFIX) :].lower()
                if is_service_link(key[len(ENV_PREFIX) :], value, fields):
                    links.append(key)
                elif name in cls.model_fields:
                    values[name] = value
                else:
                    problems.append(f"{key!r} is not a setting")
        try:
            settings = cls.model_validate(values)
        except ValidationError as e:
            for err in e.errors():
                name = str(err["loc"][0]) if err["loc"] else ""
                var = ENV_PREFIX + name.upper()
                shown = f"={values[name]!r}" if name in values else ""
                problems.append(f"{var}{shown}: {err['msg']}")
        if problems:
            known = ", ".join(ENV_PREFIX + f.upper() for f in cls.model_fields)
            if any("is not a setting" in p for p in problems):
                problems.append(f"known settings: {known}")
            raise SettingsError("bad setting: " + "; ".join(problems))
        if links:
            log.debug("skipped %d Kubernetes Service link variables: %s", len(links), links)
        return settings
