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


def test_the_dataset_row_counts_per_source() -> None:
    counts = {
        "images": 530,
        "labels": {"dandelion": 265, "grass": 265},
        "splits": {"train": 371, "val": 80, "test": 79},
        "origins": {
            "greenr": {"images": 400, "train": 280, "val": 60, "test": 60},
            "mine": {"images": 130, "train": 91, "val": 20, "test": 19},
        },
    }
    record = {"status": "succeeded", "dataset_version": "0123456789abcdef", "counts": counts}
    text = format_summary(record)
    assert (
        "  sources    greenr 400 (train 280 / val 60 / test 60); mine 130 (train 91 / val 20 / "
        "test 19)" in text
    )
    one = {**counts, "origins": {"greenr": counts["origins"]["greenr"]}}
    assert "sources" not in format_summary(record | {"counts": one})


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


class _Version:
    def __init__(self, version: str, run_id: str, tags: dict[str, str]) -> None:
        self.version, self.run_id, self.tags = version, run_id, tags


class _Client:
    """The few MLflow client calls the summary makes, over one saved ``scores.json``."""

    def __init__(self, tmp_path: Path, scores: dict | None) -> None:
        self.tmp_path, self.scores = tmp_path, scores
        self.version = _Version("2", "run2", {"serving.precision": "int8"})

    def get_model_version_by_alias(self, name: str, alias: str) -> _Version:
        return self.version

    def get_model_version(self, name: str, version: str) -> _Version:
        return self.version

    def list_artifacts(self, run_id: str) -> list:
        from types import SimpleNamespace

        return [SimpleNamespace(path="scores.json")] if self.scores else []

    def download_artifacts(self, run_id: str, path: str, dst_path: str) -> str:
        import json

        out = Path(dst_path) / path
        out.write_text(json.dumps(self.scores))
        return str(out)

    def get_run(self, run_id: str) -> object:
        from types import SimpleNamespace

        metrics = {"test_accuracy": 0.9, "test_ood_unknown_share": 0.5}
        return SimpleNamespace(data=SimpleNamespace(metrics=metrics))


def test_the_model_row_reads_the_saved_scores_as_served(tmp_path: Path, monkeypatch) -> None:
    from dandelion_lib import summary
    from dandelion_lib.lifecycle import registry

    reports = {
        "fp32": {"metrics": {"accuracy": 0.95, "ood_unknown_share": 0.8}},
        "int8": {"metrics": {"accuracy": 0.94, "ood_unknown_share": float("nan")}},
    }
    client = _Client(tmp_path, {"version": "2", "reports": reports})
    monkeypatch.setattr(registry, "configure_mlflow", lambda settings: client)
    row = summary.model_summary(Settings(workdir=tmp_path), "2")["model"]
    assert (row["test_accuracy"], row["test_ood_unknown_share"]) == (0.94, None)  # INT8 served
    client.scores = None  # a version scored before scores were saved: its training metrics
    row = summary.model_summary(Settings(workdir=tmp_path), None)["model"]
    assert (row["test_accuracy"], row["test_ood_unknown_share"]) == (0.9, 0.5)
    assert not row["trained_in_this_run"]
