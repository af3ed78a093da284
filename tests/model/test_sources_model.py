"""Several labelled sources through training: right answers and refusals per source, the
detector calibrated on every source with the floor for two sources.

The two sources are the reference photos split in two folders (``north``: the first half of
each class by file name, ``south``: the rest), so both are real photos; training runs on the
test stand-in backbone (see conftest), everything else is real (store, MLflow, ONNX runtime).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.lifecycle import evaluate
from dandelion_lib.lifecycle.registry import configure_mlflow
from dandelion_lib.serving.predict import Predictor
from dandelion_lib.training import openset
from tests.model.conftest import STAND_IN_FLOOR, tiny_config


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path, ood_dir: Path) -> Any:
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.lifecycle.train import train

    root = tmp_path_factory.mktemp("sources")
    for label in ("dandelion", "grass"):
        photos = sorted((greenr_dir / label).iterdir())
        for i, photo in enumerate(photos):
            half = "north" if i < len(photos) // 2 else "south"
            (root / half / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / half / label / photo.name)
    work = root / "work"
    settings = Settings(
        workdir=work,
        store_url=(work / "store").as_uri(),
        source=f"{root / 'north'},{root / 'south'}",
        negatives_source=str(ood_dir),
        promotion_floor=STAND_IN_FLOOR,
    )
    store = open_store(settings=settings)
    version = ingest(settings, store=store, progress=False).version
    result = train(tiny_config(), settings, store=store, progress=False)
    return settings, store, version, result


def test_every_figure_is_reported_per_source(two_sources: Any) -> None:
    import mlflow

    settings, _, _, result = two_sources
    configure_mlflow(settings)
    run = mlflow.MlflowClient().get_run(result.run_id).data
    metrics = run.metrics
    # right answers never exceed argmax accuracy: uncertain and unknown are not right
    assert 0.0 < metrics["test_right_answers"] <= metrics["test_accuracy"] + 1e-9
    for origin in ("north", "south"):
        n = metrics[f"test_source_{origin}_n"]
        assert n > 0
        for figure in ("right_answers", "accuracy", "unknown_share", "uncertain_share"):
            assert 0.0 <= metrics[f"test_source_{origin}_{figure}"] <= 1.0
    assert metrics["test_source_north_n"] + metrics["test_source_south_n"] == metrics["test_n"]
    assert metrics["test_max_source_unknown_share"] == max(
        metrics["test_source_north_unknown_share"], metrics["test_source_south_unknown_share"]
    )
    # two labelled sources: calibrated on both, never below the two-source floor
    assert run.params["openset_sources"] == "2"
    assert metrics["openset_floor"] == openset.SCORE_FLOOR
    assert metrics["openset_threshold"] >= openset.SCORE_FLOOR


def test_a_folder_is_one_source_in_dandelion_evaluate(two_sources: Any, greenr_dir: Path) -> None:
    settings, _, _, result = two_sources
    configure_mlflow(settings)
    predictor = Predictor.load_for_users(result.model_uri, settings)
    report, _ = evaluate.evaluate_folder(predictor, greenr_dir)
    assert set(report.metrics["by_source"]) == {greenr_dir.name}
    assert "per source" in report.table()


def test_one_source_gets_the_higher_floor(trained: Any, mlflow_client: Any) -> None:
    run = mlflow_client.get_run(trained.run_id).data
    assert run.params["openset_sources"] == "1"
    assert run.metrics["openset_floor"] == openset.SCORE_FLOOR_ONE_SOURCE
