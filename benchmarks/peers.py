"""The tools users run today, each in a virtual environment of its own beside the repo.

CellTypist (``.venv-celltypist``), KServe's and MLServer's Python model servers
(``.venv-kserve``, ``.venv-mlserver``): pinned versions, installed from PyPI once and reused
(a ``.installed`` file lists what went in; delete the folder to start over). They never share
our environment: their pins (pandas, fastapi, protobuf...) need not agree with ours.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: each peer: its requirements (exact versions: the numbers written down name them)
REQUIREMENTS: dict[str, list[str]] = {
    "celltypist": ["celltypist==1.7.1", "scikit-learn<1.6"],
    "kserve": ["kserve==0.21.0"],
    "mlserver": ["mlserver==1.7.1"],
}


def peer_venv(name: str) -> Path:
    """The folder of peer ``name``'s venv (``.venv-NAME``)."""
    return ROOT / f".venv-{name}"


def peer_python(name: str, install: bool = True) -> Path:
    """The Python of peer ``name``'s venv, created first when missing (python3.11 -m venv,
    pip install of :data:`REQUIREMENTS`; a failure exits naming the pip error)."""
    venv = peer_venv(name)
    python = venv / "bin" / "python"
    if install and not (venv / ".installed").exists():
        base = shutil.which("python3.11") or sys.executable
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        for what in (["--upgrade", "pip"], REQUIREMENTS[name]):
            res = subprocess.run([*pip, *what], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"pip install {' '.join(what)} failed:\n{res.stderr[-3000:]}")
        (venv / ".installed").write_text("\n".join(REQUIREMENTS[name]) + "\n")
    return python


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
