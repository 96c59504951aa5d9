"""The package layout: folders at the top of the repository mapped onto ``cellexplain.*`` by
setuptools (pyproject.toml), with no links, every package listed, and no import by a folder's
bare name (which works only from a checkout, never for a user)."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
MAPPED = SETUPTOOLS["package-dir"]
BARE = {Path(folder).name for name, folder in MAPPED.items() if name != "cellexplain"}


def _folder_packages() -> set[str]:
    """Every folder under a mapped one that Python would import: those with an __init__.py
    and the data folders (namespace packages) that hold files."""
    found = set()
    for package, folder in MAPPED.items():
        top = ROOT / folder
        for d in [top, *(p for p in top.rglob("*") if p.is_dir())]:
            rel = d.relative_to(top).parts
            if "__pycache__" in rel or any(part.startswith(".") for part in rel):
                continue
            if package == "cellexplain" and rel:
                continue
            if (d / "__init__.py").is_file() or any(f.is_file() for f in d.iterdir()):
                found.add(".".join([package, *rel]))
    return found


def test_every_package_is_listed_and_mapped():
    listed = set(SETUPTOOLS["packages"])
    on_disk = _folder_packages()  # api/_generated: made by the (editable) install
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed <= on_disk, f"listed but not on disk: {sorted(listed - on_disk)}"
    for package in listed:  # each maps onto a folder through its top-level mapping
        top = ".".join(package.split(".")[:2])
        assert top in MAPPED, package


def test_the_repository_holds_no_links():
    skip = {".git", ".venv", "build", "dist", ".cache", "node_modules"}
    links = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        links += [
            os.path.join(folder, n) for n in dirs + files if os.path.islink(os.path.join(folder, n))
        ]
    assert not links, f"symbolic links in the repository: {links}"


def test_no_import_by_a_bare_folder_name():
    """``import service...`` would pass from the repository's root and fail for every user."""
    offenders = []
    folders = [*(ROOT / f for f in MAPPED.values()), ROOT / "tests", ROOT / "benchmarks"]
    for folder in [*folders, ROOT / "load_tests"]:
        for path in folder.rglob("*.py"):
            if "_generated" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", "") == "files"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names = [str(node.args[0].value)]
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {n}"  # type: ignore[attr-defined]
                    for n in names
                    if n.split(".")[0] in BARE
                ]
    assert not offenders, offenders


def test_the_root_module_is_the_only_thing_in_src():
    root = ROOT / "src" / "cellexplain"
    assert sorted(p.name for p in root.iterdir() if p.suffix == ".py") == [
        "__init__.py",
        "__main__.py",
    ]
