"""notebooks/02_train.ipynb and 03_evaluate.ipynb run end to end under Papermill with the
dandelion kernel, on a small subset, against a fresh embedded store and MLflow database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dandelion_lib import registry
from dandelion_lib.config import Settings
from dandelion_lib.ingest import ingest
from dandelion_lib.storage import open_store

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = [ROOT / "notebooks" / "02_train.ipynb", ROOT / "notebooks" / "03_evaluate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_and_parameterized(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "dandelion"


def _papermill(
    notebook: Path, out: Path, env: dict[str, str], *params: str
) -> nbformat.NotebookNode:
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(notebook), str(out), "-k", "dandelion", *params],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return nbformat.read(out, as_version=4)


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    return text, sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow  # two kernels, each importing TensorFlow, plus a training run: ~1 min
def test_train_then_evaluate_notebooks(greenr_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = Settings(workdir=work, max_per_class=50)
    store = open_store(settings=settings)
    version = ingest(settings, source=str(greenr_dir), store=store, progress=False).version
    env = {
        **os.environ,
        "JUPYTER_PATH": str(ROOT / ".venv" / "share" / "jupyter"),
        "PYTHONPATH": str(ROOT),
        "DANDELION_WORKDIR": str(work),
        "DANDELION_PROMOTION_FLOOR": "0.8",  # a 100-image subset: the flow is under test
    }
    trained = _papermill(
        NOTEBOOKS[0], tmp_path / "02.ipynb", env, "-p", "augment_copies", "0", "-p", "seed", "5"
    )
    text, images = _outputs(trained)
    assert f"dataset {version}:" in text and "models:/dandelion/1" in text
    assert images >= 4  # learning curves, confusion matrix, ROC, misclassified grid

    evaluated = _papermill(NOTEBOOKS[1], tmp_path / "03.ipynb", env)
    text, images = _outputs(evaluated)
    assert "confusion matrix" in text and images >= 3  # confusion, ROC, calibration
    assert "PROMOTED: dandelion version 1" in text

    client = registry.configure_mlflow(settings)
    champion = client.get_model_version_by_alias("dandelion", registry.CHAMPION)
    assert str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "promoted"
