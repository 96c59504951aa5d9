"""The package's layers, read from the source (AST): which module may import which.

``cellexplain.models`` (training, cards, runtime) never imports the layers above it;
``cellexplain.api`` (the shared contract) never imports the server or the clients; the clients
import the server only inside the functions that need it (``--local``), so the base install
(no onnxruntime, BentoML or Prometheus) can import them; nothing imports the folders by their
bare names (``models``, ``service``...), which an installed package does not have.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cellexplain.client.cli import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("models", "api", "service", "client")
#: third-party modules that only the `serve` / `train` / `report` extras install:
#: the CLI's own map of them (which it uses to name the `pip install`), plus the build-only
#: protobuf compiler
EXTRA_MODULES = {*EXTRAS, "grpc_tools"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at_top_level)`` for every import in a file (``if TYPE_CHECKING`` blocks are
    not imports at run time and are skipped)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, top))
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, inner)

    visit(tree, True)
    return found


def modules(layer: str) -> list[Path]:
    return sorted(p for p in (ROOT / layer).rglob("*.py") if "_generated" not in p.parts)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_the_folders_by_their_bare_names(layer):
    bad = [
        (p.relative_to(ROOT), m)
        for p in modules(layer)
        for m, _ in imports(p)
        if m.split(".")[0] in LAYERS
    ]
    assert not bad, f"import cellexplain.<layer>, never the folder's bare name: {bad}"


def layer_imports(layer: str, top_only: bool = False) -> set[tuple[str, str]]:
    return {
        (str(p.relative_to(ROOT)), m)
        for p in modules(layer)
        for m, top in imports(p)
        if m.startswith("cellexplain.") and (top or not top_only)
    }


def test_training_never_imports_serving_clients_or_api():
    bad = {(f, m) for f, m in layer_imports("models") if m.split(".")[1] != "models"}
    assert not bad, bad


def test_the_api_never_imports_the_server_or_the_clients():
    bad = {(f, m) for f, m in layer_imports("api") if m.split(".")[1] in ("service", "client")}
    assert not bad, bad


def test_the_server_never_imports_the_clients():
    bad = {(f, m) for f, m in layer_imports("service") if m.split(".")[1] == "client"}
    assert not bad, bad


def test_clients_import_the_server_and_training_only_when_a_command_needs_them():
    bad = {
        (f, m)
        for f, m in layer_imports("client", top_only=True)
        if m.split(".")[1] == "service"
        or m.startswith(("cellexplain.models.train", "cellexplain.models.runtime"))
    }
    assert not bad, bad


@pytest.mark.parametrize("layer", ["api", "client"])
def test_the_base_install_imports_no_extra_at_module_level(layer):
    """What `pip install cellexplain` gives must import (the clean-venv test runs it too)."""
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p in modules(layer)
        for m, top in imports(p)
        if top and m.split(".")[0] in EXTRA_MODULES
    ]
    assert not bad, bad


def test_each_folder_is_the_package_of_its_name():
    """The installed ``cellexplain.<layer>`` is the folder of that name (the editable install's
    mapping, pyproject.toml's package-dir)."""
    import importlib

    for layer in LAYERS:
        module = importlib.import_module(f"cellexplain.{layer}")
        assert Path(module.__file__ or "").resolve().parent == (ROOT / layer).resolve(), layer


def module_path(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_nothing_the_base_install_imports_needs_an_extra():
    """Follow the module-level imports from the clients and the api through the project (into
    cellexplain.models too): none reaches a module of an extra."""
    seen: set[Path] = set()
    todo = [p for layer in ("api", "client") for p in modules(layer)]
    bad = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for m, top in imports(path):
            if not top:
                continue
            if m.split(".")[0] in EXTRA_MODULES:
                bad.append((str(path.relative_to(ROOT)), m))
            elif m.startswith("cellexplain."):
                target = module_path(m)
                if target is not None:
                    todo.append(target)
    assert any("models" in p.parts for p in seen)  # the walk did reach the lower layer
    assert not bad, bad
