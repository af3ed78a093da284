"""Change detection (dandelion_lib.lifecycle.changes): the code version follows the code cells only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import NOTEBOOKS
from dandelion_lib.lifecycle.changes import code_version

ROOT = Path(__file__).resolve().parents[2]


def copy_notebooks(dst: Path) -> Path:
    dst.mkdir()
    for name in NOTEBOOKS.values():
        shutil.copy(ROOT / "notebooks" / name, dst / name)
    return dst


def edit(path: Path, cell_type: str, text: str) -> None:
    nb = json.loads(path.read_text())
    nb["cells"].append({"cell_type": cell_type, "metadata": {}, "source": [text]})
    if cell_type == "code":
        nb["cells"][-1] |= {"outputs": [], "execution_count": None}
    path.write_text(json.dumps(nb))


def test_code_version_follows_code_cells_only(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path)
    notebooks = copy_notebooks(tmp_path / "nb")
    before = code_version(settings, notebooks)
    assert len(before) == 12 and before == code_version(settings, notebooks)
    edit(notebooks / NOTEBOOKS["train"], "markdown", "A note changes nothing.")
    assert code_version(settings, notebooks) == before
    edit(notebooks / NOTEBOOKS["train"], "code", "x = 1")
    assert code_version(settings, notebooks) != before


def test_code_version_covers_the_whole_library(tmp_path: Path, monkeypatch) -> None:
    """Every sub-package of dandelion_lib counts, not only the one change detection lives in."""
    from dandelion_lib.lifecycle import changes

    package = tmp_path / "repo" / "dandelion_lib"
    (package / "lifecycle").mkdir(parents=True)
    (package / "training").mkdir()
    (package / "lifecycle" / "changes.py").write_text("# change detection")
    (package / "training" / "fitting.py").write_text("LEARNING_RATE = 0.1")
    monkeypatch.setattr(changes, "__file__", str(package / "lifecycle" / "changes.py"))
    settings = Settings(workdir=tmp_path)
    notebooks = copy_notebooks(tmp_path / "nb")
    before = code_version(settings, notebooks)
    (package / "training" / "fitting.py").write_text("LEARNING_RATE = 0.2")
    after = code_version(settings, notebooks)
    assert after != before
    (tmp_path / "repo" / "requirements.lock").write_text("numpy==2.0\n")
    assert code_version(settings, notebooks) != after
