"""cellexplain: cell-type annotation with faithful per-gene attributions, served from ONNX graphs.

One distribution, four packages, each mapped onto a folder at the top of the repository by
setuptools' ``package-dir`` (pyproject.toml; no links), layered so that each imports only those
below it:

* :mod:`cellexplain.client` (``client/``): the Python client, file pipeline, report and the
  ``cellexplain`` command. Installs with the base dependencies; ``--local`` and training load
  the other layers only when asked for.
* :mod:`cellexplain.service` (``service/``): the server: the annotation core, a codec per front
  door (REST JSON, gRPC, Open Inference Protocol, AnnData uploads), BentoML and gRPC servers.
  Needs the ``serve`` extra.
* :mod:`cellexplain.api` (``api/``): the contract both sides share: schemas, errors (with their
  HTTP status and gRPC code), annotations as AnnData, the protobuf codec and generated modules.
* :mod:`cellexplain.models` (``models/``): model cards, preprocessing and the onnxruntime
  runner; training and ONNX export (the ``train`` extra). Never imports the layers above.
"""

__version__ = "0.1.0"
