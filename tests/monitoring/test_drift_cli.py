"""`dandelion drift` and notebooks/04_drift.ipynb against a model in a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dandelion_lib.lifecycle.drift import drift_report
from dandelion_lib.lifecycle.monitoring import DriftError, load_reference
from tests.notebook_support import ROOT, assert_clean_and_parameterized, outputs, run_papermill

DRIFT_NOTEBOOK = ROOT / "notebooks" / "04_drift.ipynb"


def _run_cli(args: list[str], tracking_uri: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DANDELION_TRACKING_URI": tracking_uri,
        "DANDELION_WORKDIR": str(tmp_path / "work"),
    }
    return subprocess.run(
        [sys.executable, "-m", "dandelion_lib.cli", "drift", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )


def test_reference_is_read_from_the_registered_model(
    registered_model: str, drift_reference: dict
) -> None:
    assert load_reference(registered_model) == drift_reference
    with pytest.raises(DriftError, match="cannot read model"):
        load_reference("models:/no-such-model@champion")


def test_cli_in_distribution_exits_0(
    registered_model: str, mlflow_server: str, greenr_dir: Path, tmp_path: Path
) -> None:
    """The whole reference dataset (400 photos) against its own training half."""
    proc = _run_cli(
        ["--model", registered_model, "--images", str(greenr_dir)], mlflow_server, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "drift check: 400 images" in out
    assert "verdict: NO DRIFT - 0 of 6 features drifted" in out
    for feature in ("brightness", "contrast", "saturation", "green_fraction", "sharpness"):
        assert feature in out


def test_cli_dark_batch_exits_1_with_json(
    registered_model: str, mlflow_server: str, dark_dir: Path, tmp_path: Path
) -> None:
    proc = _run_cli(
        ["--model", registered_model, "--images", str(dark_dir), "--json"], mlflow_server, tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verdict"] == "drift" and report["images"] == 40
    assert report["source"] == registered_model
    brightness = next(f for f in report["features"] if f["feature"] == "brightness")
    assert brightness["drifted"] and brightness["psi"] > 1.0


def test_cli_user_errors_are_one_line(
    registered_model: str, mlflow_server: str, tmp_path: Path
) -> None:
    proc = _run_cli(
        ["--model", registered_model, "--images", str(tmp_path / "nope")], mlflow_server, tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dandelion drift: error: images folder")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = _run_cli(
        ["--model", "models:/missing@champion", "--images", str(tmp_path)], mlflow_server, tmp_path
    )
    assert proc.returncode == 2
    assert "cannot read model models:/missing@champion" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_from_a_loaded_predictor(registered_model: str, gray_dir: Path) -> None:
    """The API passes its Predictor; the report uses the reference the model carries."""
    from dandelion_lib.core.config import Settings
    from dandelion_lib.serving.predict import Predictor

    predictor = Predictor.load(registered_model, Settings())
    report = drift_report(predictor, gray_dir, settings=Settings())
    assert report.source == registered_model and report.verdict == "drift"


@pytest.mark.slow  # a kernel importing MLflow and the library: about 20 s
def test_notebook_runs_with_papermill(
    registered_model: str, mlflow_server: str, dark_dir: Path, tmp_path: Path
) -> None:
    nb = run_papermill(
        DRIFT_NOTEBOOK,
        tmp_path / "04_drift.out.ipynb",
        *("-p", "model_uri", registered_model),
        *("-p", "images_dir", str(dark_dir)),
        *("-p", "tracking_uri", mlflow_server),
        timeout=300,
        cwd=tmp_path,
    )
    text, images = outputs(nb)
    assert "verdict: DRIFT" in text
    assert images, "the decile plot was not rendered"


def test_committed_notebook_is_clean_and_parameterized() -> None:
    assert_clean_and_parameterized(DRIFT_NOTEBOOK)
