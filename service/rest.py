"""The BentoML service: a thin shim that serves :func:`~cellexplain.service.app.create_app`'s
HTTP API in each worker, beside gRPC (:mod:`cellexplain.service.grpc.server`), from one
:class:`~cellexplain.service.core.Annotator`. BentoML provides the server processes,
``/livez``, ``/readyz`` and ``/metrics``; the :class:`~cellexplain.service.gate.Gate` guards
all of them.

Importing this module configures the process it serves from (the settings from the
environment, the allocator, bounded metric labels, HTTP head timeouts): import
:mod:`cellexplain.service.app` to build the API without that.

Run: ``bentoml serve cellexplain.service.rest:CellExplain --port 3000`` (``make serve`` does).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import bentoml
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cellexplain.service import allocator, http_timeouts, logs, metrics, sandbox
from cellexplain.service.app import create_app
from cellexplain.service.core import Annotator, resolve_models
from cellexplain.service.gate import Gate
from cellexplain.service.grpc.server import GrpcServer
from cellexplain.service.settings import Settings, SettingsError
from cellexplain.service.shutdown import ShutdownDeadline
from cellexplain.service.workers import WorkerWatch

log = logging.getLogger(__name__)
try:
    SETTINGS = Settings.from_env()
except SettingsError as e:  # one line naming the variable, not a traceback through the loader
    sys.exit(f"cellexplain: {e}")
allocator.tune(trim_every_s=SETTINGS.malloc_trim_s)  # every worker, before the model and requests
metrics.bound_http_route_labels()  # no metric label takes a path a client chose
http_timeouts.install(SETTINGS.http_header_timeout_s)  # request heads arrive in time
if importlib.util.find_spec("httptools") is not None:
    # uvicorn's "auto" HTTP parser, which BentoML uses: httptools when installed, else h11
    log.warning(
        "httptools is installed, so uvicorn parses HTTP with it: it bounds neither the size "
        "nor the number of a request's headers while it reads them (h11, used without it, "
        "refuses a head still incomplete beyond ~272 KiB) and keeps trailing spaces in header "
        "values; serve from an environment without httptools (the service's requirements do "
        "not include it)"
    )


class _WorkerApp(Starlette):
    """The API of this worker, mounted when BentoML imports the service and built when it
    starts the worker (:meth:`CellExplain.__init__`), once the models are loaded. Its routes
    only tell BentoML's passive mount which paths are ours (``/v1/...``, ``/v2``, ``/v2/...``);
    BentoML's own (``/``, ``/docs.json``, the probes, ``/metrics``) stay BentoML's."""

    def __init__(self) -> None:
        super().__init__(
            routes=[Mount("/v1", app=self), Route("/v2", self), Mount("/v2", app=self)]
        )
        self.api: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)  # nothing to start
        elif self.api is None:  # BentoML serves only once the instance exists
            await PlainTextResponse("starting", status_code=503)(scope, receive, send)
        else:
            await self.api(scope, receive, send)


API = _WorkerApp()


@bentoml.service(
    name="cellexplain",
    workers=SETTINGS.n_workers,
    traffic={"timeout": SETTINGS.request_timeout_s + 30},  # parsing + serialising too
    http={"port": SETTINGS.http_port},
)
@bentoml.asgi_app(API, path="/")
class CellExplain:
    """Serves the configured models over REST and, from the same core, gRPC."""

    @bentoml.on_deployment
    def _check_models() -> None:
        """Once, before any worker starts: a model that is missing stops the server with one
        line, rather than workers that fail and are restarted without end."""
        try:
            resolve_models(SETTINGS)
        except SettingsError as e:
            sys.exit(f"cellexplain: {e}")

    def __init__(self) -> None:
        logs.configure(SETTINGS.log_format)  # BentoML has set its logging up by now
        sandbox.remove_orphans()  # what workers killed mid-upload left in TMPDIR
        self.annotator = Annotator.from_settings(SETTINGS)
        API.api = create_app(
            SETTINGS, self.annotator, self.__is_ready__, gate=False, alive=self.__is_alive__
        )
        self.grpc: GrpcServer | None = None
        if SETTINGS.grpc_enabled:
            self.grpc = GrpcServer(self.annotator, SETTINGS)
            self.grpc.start()

        self._deadline = ShutdownDeadline(SETTINGS.shutdown_grace_s, self._drain_grpc)
        self._deadline.install()
        # a sibling that died is not replaced inside a container: the probes say so
        self.workers = WorkerWatch(
            SETTINGS.n_workers, self.grpc.set_serving if self.grpc is not None else None
        )
        self.workers.start()

    def _drain_grpc(self) -> None:
        if self.grpc is not None:
            self.grpc.stop_async(SETTINGS.shutdown_grace_s)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.workers.stop()
        if self.grpc is not None:
            self.grpc.stop(SETTINGS.shutdown_grace_s)
        self.annotator.close()

    def __is_ready__(self) -> bool:
        """``/readyz``: every model loaded and warmed up, and every worker alive."""
        return bool(self.annotator.models) and self.workers.all_alive()

    def __is_alive__(self) -> bool:
        """``/livez``: every worker the server started is alive (a dead one is not replaced
        inside a container: the kubelet restarts the container instead)."""
        return self.workers.all_alive()


CellExplain.add_asgi_middleware(Gate, settings=SETTINGS)  # type: ignore[attr-defined]
