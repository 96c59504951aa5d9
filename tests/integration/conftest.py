"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.servers import import_into_store


@pytest.fixture(scope="module")
def programs_home(programs_model, tmp_path_factory) -> Path:
    """A fresh BentoML home (one per test module) whose store holds the session's programs
    model; a module may import more models into it."""
    _, artifact = programs_model
    home = tmp_path_factory.mktemp("bentoml_home")
    import_into_store(artifact, home)
    return home
