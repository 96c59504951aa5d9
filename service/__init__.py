"""cellexplain's server: the annotation core, its front doors (REST, gRPC, Open Inference
Protocol, AnnData uploads) and the BentoML service. Needs the ``serve`` extra and Python 3.11 or
newer (the client, :mod:`cellexplain.client`, runs on 3.10 too)."""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 - the package installs on 3.10 for its client
    raise ImportError(
        "the cellexplain server (and `cellexplain annotate --local`) needs Python 3.11 or newer; "
        f"this is {sys.version.split()[0]}. The client (`cellexplain annotate --url ...`) runs "
        "on Python 3.10-3.13."
    )
