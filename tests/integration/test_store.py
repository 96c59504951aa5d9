"""The BentoML store read from its files (models/store.py, ``stored_files``) gives what
BentoML's own API gives, and steps aside whenever the files are not as BentoML writes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.servers import REPO

pytestmark = pytest.mark.integration

PROBE = """
import json, sys
from cellexplain.models.store import stored_files
import bentoml
out = {}
for tag in sys.argv[1:]:
    fast = stored_files(tag)
    try:
        m = bentoml.models.get(tag)
        api = [str(m.tag), str(m.path)]
    except bentoml.exceptions.NotFound:
        api = None
    out[tag] = {"fast": [fast[0], str(fast[1])] if fast else None, "api": api}
print(json.dumps(out))
"""


def probe(home: Path, *tags: str, **env: str) -> dict:
    full = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", **env}
    res = subprocess.run([sys.executable, "-c", PROBE, *tags], capture_output=True, text=True,
                         env=full, cwd=REPO, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def test_the_store_read_from_its_files_agrees_with_bentoml(programs_home, monkeypatch):
    version = (programs_home / "models" / "pbmc-programs" / "latest").read_text().strip()
    got = probe(programs_home, "pbmc-programs", f"pbmc-programs:{version}", "pbmc-programs:latest",
                "no-such-model")  # fmt: skip
    for tag in ("pbmc-programs", f"pbmc-programs:{version}", "pbmc-programs:latest"):
        assert got[tag]["fast"] is not None and got[tag]["fast"] == got[tag]["api"], got[tag]
    assert got["no-such-model"] == {"fast": None, "api": None}
    # a configured store may live elsewhere: BentoML is asked
    from cellexplain.models.store import stored_files

    monkeypatch.setenv("BENTOML_HOME", str(programs_home))
    assert stored_files("pbmc-programs") is not None
    monkeypatch.setenv("BENTOML_CONFIG", str(programs_home / "bentoml.yaml"))
    assert stored_files("pbmc-programs") is None


def test_files_not_as_bentoml_writes_them_are_left_to_bentoml(programs_home, tmp_path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(programs_home / "models", home / "models")
    version = (home / "models" / "pbmc-programs" / "latest").read_text().strip()
    yaml = home / "models" / "pbmc-programs" / version / "model.yaml"
    yaml.write_text(yaml.read_text().replace("framework: cellexplain", "framework: sklearn"))
    got = probe(home, "pbmc-programs")["pbmc-programs"]
    assert got["fast"] is None and got["api"] is not None
