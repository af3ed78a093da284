"""The run summary (dandelion_lib.summary): where to look after a run."""

from __future__ import annotations

from pathlib import Path

from dandelion_lib.core.config import Settings
from dandelion_lib.summary import format_summary, where_to_look


def test_where_to_look_names_mlflow_and_the_run_folder(tmp_path: Path) -> None:
    local = where_to_look(Settings(workdir=tmp_path), "manual__1")
    assert local["mlflow"].startswith("mlflow ui --backend-store-uri sqlite:///")
    assert local["notebooks"] == f"{tmp_path.resolve() / 'store'}/runs/manual__1/"
    served = where_to_look(Settings(workdir=tmp_path, tracking_uri="http://127.0.0.1:5000"))
    assert served["mlflow"] == "open http://127.0.0.1:5000" and "notebooks" not in served


def test_a_failed_run_says_which_step() -> None:
    text = format_summary(
        {
            "status": "failed",
            "dag_id": "dandelion_pipeline",
            "run_id": "r1",
            "failures": [{"task_id": "validate_data", "error": "dataset x failed validation"}],
        }
    )
    assert text.splitlines()[0].startswith("dandelion pipeline: FAILED")
    assert "validate_data: dataset x failed validation" in text


def test_the_extraction_shards_are_added_up() -> None:
    from dandelion_lib.summary import feature_totals

    totals = feature_totals(
        [
            {"images": 256, "features_cached": 1200, "features_computed": 80},
            {"images": 144, "features_cached": 700, "features_computed": 0},
        ]
    )
    assert totals == {
        "shards": 2,
        "images": 400,
        "features_cached": 1900,
        "features_computed": 80,
    }
    text = format_summary({"status": "succeeded", "features": totals})
    assert "features   80 embeddings computed, 1900 read from the feature store (2 shards)" in text
