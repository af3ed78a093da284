"""scripts/pip.sh, the pip that `nox -s images` downloads the wheelhouse with
(scripts/docker-wheelhouse.sh) and scripts/docker-engine.sh fetches Compose with: inside a nox
session python3 is the shared .venv's, and uv creates venvs without pip. Run here with such a
venv first on PATH, as the images session runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "pip.sh"


@pytest.fixture(scope="module")
def pipless_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (nox sessions need it)")
    venv = tmp_path_factory.mktemp("pipless") / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONHOME", None)
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_uv_venv_has_no_pip(pipless_venv: Path) -> None:
    """The situation the script exists for (a nox session's python3)."""
    proc = subprocess.run(
        [str(pipless_venv / "bin" / "python3"), "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "No module named pip" in proc.stderr


def test_finds_a_pip_inside_a_pipless_venv(pipless_venv: Path) -> None:
    which = _run(pipless_venv, "--which")
    assert which.returncode == 0, which.stderr
    assert not which.stdout.startswith("python3 "), which.stdout
    proc = _run(pipless_venv, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pip "), proc.stdout
