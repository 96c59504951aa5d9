"""Compile ``protos/*.proto`` with grpcio-tools into ``_generated/`` (never edited by hand).

``python -m service.grpc.codegen`` regenerates; :func:`load` imports the generated modules,
compiling them first when they are missing or were made from other protos. The wheel (and so
the Bento) ships ``_generated/``, so an installed service never compiles, never writes into its
own package (read-only in the container) and never imports grpcio-tools.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "protos"
GEN_DIR = HERE / "_generated"
STAMP = GEN_DIR / "STAMP"
PROTOS = ("cellexplain_v1.proto", "grpc_predict_v2.proto")


def _fingerprint() -> str:
    """The protos' hash: generated code is current when it was made from these protos."""
    h = hashlib.sha256()
    for name in PROTOS:
        h.update((PROTO_DIR / name).read_bytes())
    return h.hexdigest()


def generate(force: bool = False) -> Path:
    """Generate the modules unless up to date; safe when several processes race."""
    from grpc_tools import protoc

    stamp = _fingerprint()
    if not force and STAMP.is_file() and STAMP.read_text() == stamp:
        return GEN_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=HERE))
    try:
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            *(str(PROTO_DIR / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
        (tmp / "STAMP").write_text(stamp)
        old = HERE / f".old-{os.getpid()}"
        if GEN_DIR.exists():
            os.replace(GEN_DIR, old)
        os.replace(tmp, GEN_DIR)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GEN_DIR


def load(name: str) -> ModuleType:
    """Import a generated module, e.g. ``load("cellexplain_v1_pb2")``."""
    if not (STAMP.is_file() and STAMP.read_text() == _fingerprint()):
        generate()
    if str(GEN_DIR) not in sys.path:
        sys.path.insert(0, str(GEN_DIR))  # the generated *_grpc modules import their *_pb2
    return importlib.import_module(name)


if __name__ == "__main__":
    print(generate(force="--force" in sys.argv))
