"""Fixtures shared by the integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import locked, shared_folder
from tests.integration.servers import REPO, import_into_store


@pytest.fixture(scope="module")
def programs_home(programs_model, tmp_path_factory) -> Path:
    """A fresh BentoML home (one per test module) whose store holds the session's programs
    model; a module may import more models into it."""
    _, artifact = programs_model
    home = tmp_path_factory.mktemp("bentoml_home")
    import_into_store(artifact, home)
    return home


@pytest.fixture(scope="session")
def bentos(programs_model, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Both Bentos of the repo's bentofiles, built once for the run (every xdist worker shares
    them: the first to ask builds, under a lock) as `make bento` does: the wheel first, by
    `python -m build` (an sdist, then a wheel built from the unpacked sdist, so what the Bentos
    install is what an sdist install gives), into the repo's dist/ where the bentofiles find
    it. (A BentoML home holding the session's programs model and the Bentos, {"cpu"|"gpu":
    Bento folder}); the tests only read them."""
    home, lock = shared_folder(tmp_path_factory, "bento-home")
    done = home / "built.json"
    with locked(lock):
        if not done.is_file():
            home.mkdir(exist_ok=True)
            import_into_store(programs_model[1], home)
            for old in (REPO / "dist").glob("cellexplain-*"):
                old.unlink()
            wheel = subprocess.run(
                [sys.executable, "-m", "build", "--outdir", "dist", "."],
                cwd=REPO, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert wheel.returncode == 0, wheel.stdout[-3000:] + wheel.stderr[-3000:]
            assert "Successfully built cellexplain-" in wheel.stdout, wheel.stdout[-3000:]
            assert ".tar.gz" in wheel.stdout, wheel.stdout[-3000:]
            env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
            folders = {}
            for variant, bentofile in (("cpu", "bentofile.yaml"), ("gpu", "bentofile.gpu.yaml")):
                out = subprocess.run(
                    [sys.executable, "-m", "bentoml", "build", "-f", bentofile, "--output",
                     "tag", "."],
                    cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
                tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
                name, version = tag.split(":")
                folders[variant] = str(home / "bentos" / name / version)
            done.write_text(json.dumps(folders))
    return home, {k: Path(v) for k, v in json.loads(done.read_text()).items()}
