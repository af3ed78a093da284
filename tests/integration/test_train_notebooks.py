"""notebooks/02_train.ipynb and 03_evaluate.ipynb run end to end under Papermill with the
dandelion kernel, on a small subset, against a fresh embedded store and MLflow database."""

from __future__ import annotations

from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import open_store
from dandelion_lib.data.ingest import ingest
from dandelion_lib.lifecycle import registry
from tests.notebook_support import ROOT, assert_clean_and_parameterized, outputs, run_papermill

NOTEBOOKS = [ROOT / "notebooks" / "02_train.ipynb", ROOT / "notebooks" / "03_evaluate.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_and_parameterized(path: Path) -> None:
    assert_clean_and_parameterized(path)


@pytest.mark.slow  # two kernels, each importing TensorFlow, plus a training run: ~1 min
def test_train_then_evaluate_notebooks(greenr_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = Settings(workdir=work, max_per_class=50)
    store = open_store(settings=settings)
    version = ingest(settings, source=str(greenr_dir), store=store, progress=False).version
    env = {
        "DANDELION_WORKDIR": str(work),
        "DANDELION_PROMOTION_FLOOR": "0.8",  # a 100-image subset: the flow is under test
        # no negatives: the distance-only detector of 16 validation photos refuses a few test
        # photos, which the gate's users' rule would rightly refuse; the flow is under test
        "DANDELION_PROMOTION_MAX_SOURCE_UNKNOWN": "1.0",
    }
    trained = run_papermill(
        NOTEBOOKS[0], tmp_path / "02.ipynb", "-p", "augment_copies", "0", "-p", "seed", "5", env=env
    )
    text, images = outputs(trained)
    assert f"dataset {version}:" in text and "models:/dandelion/1" in text
    assert images >= 4  # learning curves, confusion matrix, ROC, misclassified grid

    # Promoting is asked for explicitly: it is promotion.promote, as in the DAG and the CLI.
    evaluated = run_papermill(NOTEBOOKS[1], tmp_path / "03.ipynb", "-p", "promote", "True", env=env)
    text, images = outputs(evaluated)
    assert "confusion matrix" in text and images >= 3  # confusion, ROC, calibration
    assert "PROMOTED: dandelion version 1" in text and "NOT PROMOTED" not in text

    client = registry.configure_mlflow(settings)
    champion = client.get_model_version_by_alias("dandelion", registry.CHAMPION)
    assert str(champion.version) == "1"
    assert champion.tags["promotion.decision"] == "promoted"
