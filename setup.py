"""Build hook: compile the gRPC protos into the package before it is built or packed (wheel,
sdist or editable install), so that both carry ``api/_generated``. Everything else is in
pyproject.toml."""

import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build import build
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info
from setuptools.command.sdist import sdist


def _generate(force: bool = True) -> None:
    """api/codegen.py, loaded by path (the package is not importable yet); ``force``: with the
    pinned protoc, whatever was there."""
    spec = importlib.util.spec_from_file_location(
        "_cellexplain_codegen", Path(__file__).resolve().parent / "api" / "codegen.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(force=force)


class BuildWithProtos(build_py):
    def run(self):
        _generate()
        super().run()


class SdistWithProtos(sdist):
    def run(self):
        _generate()
        super().run()


def _scratch() -> str:
    """A temporary folder for what setuptools writes while building, removed at exit: a
    ``pip install`` from a checkout leaves no ``build/`` or ``*.egg-info`` in the tree."""
    path = tempfile.mkdtemp(prefix="cellexplain-build-")
    atexit.register(shutil.rmtree, path, True)
    return path


class OutOfTreeBuild(build):
    def initialize_options(self):
        super().initialize_options()
        self.build_base = _scratch()  # --build-base still wins


class OutOfTreeEggInfo(egg_info):
    def initialize_options(self):
        super().initialize_options()
        self.egg_base = _scratch()  # --egg-base still wins


# every command (egg_info first) lists cellexplain.api._generated among the packages: on a clean
# checkout it must exist before setuptools looks (grpcio-tools is a build requirement, so it is
# there whenever pip builds; compiled only when missing or older than the protos)
if importlib.util.find_spec("grpc_tools") is not None:
    _generate(force=False)

setup(
    cmdclass={
        "build": OutOfTreeBuild,
        "build_py": BuildWithProtos,
        "egg_info": OutOfTreeEggInfo,
        "sdist": SdistWithProtos,
    }
)
