"""``make typecheck``: mypy over the package as it is installed, ``cellexplain.*``.

The package's folders sit at the top of the repository and setuptools maps them onto dotted
names (``[tool.setuptools.package-dir]`` in pyproject.toml); mypy names a module from its path,
so it is handed each file with the module name the mapping gives it. The settings are
``[tool.mypy]``'s; ``--python-version 3.10 --client`` checks the client's layers (``api``,
``client``) against the oldest Python the client supports.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from mypy import build
from mypy.config_parser import parse_config_file
from mypy.errors import CompileError
from mypy.modulefinder import BuildSource
from mypy.options import Options

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ("benchmarks", "load_tests")  # repository tools, checked under their own names
CLIENT = ("cellexplain.api", "cellexplain.client")  # and what they import at module level


def sources(client_only: bool = False) -> list[BuildSource]:
    """Every module of the package under its installed name, and the repository's tools."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out: list[BuildSource] = []
    for package, folder in cfg["package-dir"].items():
        top = ROOT / folder
        for path in sorted(top.rglob("*.py")):
            rel = path.relative_to(top).with_suffix("")
            if "_generated" in rel.parts or not _in_package(top, path):
                continue  # generated code, and folders that are not packages (resources)
            parts = [p for p in rel.parts if p != "__init__"]
            out.append(BuildSource(str(path), ".".join([package, *parts])))
    if client_only:
        keep = _closure({s.module: s for s in out})
        return [s for s in out if s.module in keep]
    if not client_only:
        for tool in EXTRA:
            for path in sorted((ROOT / tool).rglob("*.py")):
                rel = path.relative_to(ROOT).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                out.append(BuildSource(str(path), ".".join(parts)))
    return out


def _closure(by_name: dict[str, BuildSource]) -> set[str]:
    """The client's modules and those they import at module level (outside ``TYPE_CHECKING``
    and functions): what ``import cellexplain.client.cli`` loads on the client's Python."""
    todo = [m for m in by_name if m.startswith(CLIENT) or m == "cellexplain"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        tree = ast.parse(Path(by_name[name].path or "").read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
    return seen


def _in_package(top: Path, path: Path) -> bool:
    return all((d / "__init__.py").is_file() for d in path.parents if d != top and top in d.parents)


def main(argv: list[str]) -> int:
    options = Options()
    parse_config_file(options, lambda: None, str(ROOT / "pyproject.toml"), sys.stdout, sys.stderr)
    client_only = "--client" in argv
    if "--python-version" in argv:
        major, minor = argv[argv.index("--python-version") + 1].split(".")
        options.python_version = (int(major), int(minor))
    options.mypy_path = []
    if client_only:  # the server's modules are absent: an ignore aimed at them is not unused
        options.warn_unused_ignores = False
    srcs = sources(client_only)
    try:
        result = build.build(srcs, options)
    except CompileError as e:
        print("\n".join(e.messages))
        return 2
    for line in result.errors:
        print(line)
    n = len({s.path for s in srcs})
    what = "client layers" if client_only else "files"
    version = ".".join(map(str, options.python_version))
    if result.errors:
        print(f"mypy (Python {version}): {len(result.errors)} errors in {n} {what}")
        return 1
    print(f"mypy (Python {version}): no issues in {n} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
