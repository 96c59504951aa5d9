"""The tools users run today, each in a virtual environment of its own beside the repo.

CellTypist (``.venv-celltypist``), KServe's and MLServer's Python model servers
(``.venv-kserve``, ``.venv-mlserver``): pinned versions, installed from PyPI once and reused
(a ``.installed`` file lists what went in; delete the folder to start over). They never share
our environment: their pins (pandas, fastapi, protobuf...) need not agree with ours.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: each peer: its requirements (exact versions: the numbers written down name them)
REQUIREMENTS: dict[str, list[str]] = {
    "celltypist": ["celltypist==1.7.1", "scikit-learn<1.6"],
    # with our onnxruntime, so that the graph runs on the same engine everywhere
    "kserve": ["kserve==0.21.0", "onnxruntime==1.32.0"],
    "mlserver": ["mlserver==1.7.1", "onnxruntime==1.32.0"],
}


def peer_venv(name: str) -> Path:
    """The folder of peer ``name``'s venv (``.venv-NAME``)."""
    return ROOT / f".venv-{name}"


def peer_python(name: str, install: bool = True) -> Path:
    """The Python of peer ``name``'s venv, created first when missing (python3.11 -m venv,
    pip install of :data:`REQUIREMENTS`, again when they changed; a failure exits naming the
    pip error)."""
    venv = peer_venv(name)
    python = venv / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS[name]) + "\n"
    marker = venv / ".installed"
    if install and (not marker.exists() or marker.read_text() != wanted):
        # one installer at a time (parallel test processes ask for the same venv)
        with open(ROOT / f".venv-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not marker.exists() or marker.read_text() != wanted:
                _install(name, venv, python, wanted)
    return python


def _install(name: str, venv: Path, python: Path, wanted: str) -> None:
    """Create the venv when it has no Python, install :data:`REQUIREMENTS`, mark it done."""
    if not python.exists():
        base = shutil.which("python3.11") or sys.executable
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for what in (["--upgrade", "pip"], REQUIREMENTS[name]):
        res = subprocess.run([*pip, *what], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"pip install {' '.join(what)} failed:\n{res.stderr[-3000:]}")
    (venv / ".installed").write_text(wanted)


def versions(name: str, packages: list[str]) -> dict[str, str]:
    """``{package: version}`` as installed in peer ``name``'s venv."""
    code = (
        "import json, sys; from importlib.metadata import version; "
        "print(json.dumps({p: version(p) for p in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(peer_python(name)), "-c", code, *packages], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)
