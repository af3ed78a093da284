"""Evaluation metrics, slices and `dandelion evaluate`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dandelion_lib.lifecycle import evaluate, metrics

LABELS = ("dandelion", "grass")


def test_classification_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    m = metrics.classification_metrics(y, probs, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["precision_dandelion"] == pytest.approx(2 / 3)
    assert m["recall_grass"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # ROC AUC on P(grass): 7 of the 9 (grass, dandelion) pairs are ranked correctly.
    assert m["roc_auc"] == pytest.approx(7 / 9)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.3, 0.8, 0.6, 0.4]))
    assert m["log_loss"] == pytest.approx(expected_loss)
    assert m["n"] == 6


def test_expected_calibration_error() -> None:
    # Confidence 0.9 and 90 % right: perfectly calibrated.
    y = np.array([0] * 9 + [1])
    probs = np.tile([0.9, 0.1], (10, 1))
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)
    # Confidence 0.9 but only 50 % right: ECE 0.4.
    y = np.array([0] * 5 + [1] * 5)
    assert metrics.expected_calibration_error(y, probs) == pytest.approx(0.4)
    # Two bins: 0.6 confident and all right (gap 0.4), 1.0 confident and all right (gap 0).
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [1.0, 0.0], [1.0, 0.0]])
    assert metrics.expected_calibration_error(np.zeros(4, int), probs) == pytest.approx(0.2)


def test_one_class_only_gives_nan_auc_not_a_crash() -> None:
    m = metrics.classification_metrics(np.zeros(3, int), np.tile([0.7, 0.3], (3, 1)), LABELS)
    assert math.isnan(m["roc_auc"]) and m["accuracy"] == 1.0
    with pytest.raises(metrics.EvaluationError):
        metrics.classification_metrics(np.zeros(0, int), np.zeros((0, 2)), LABELS)


def test_slices() -> None:
    frame = pd.DataFrame(
        {
            "label": ["dandelion", "dandelion", "grass", "grass"],
            "predicted": ["dandelion", "grass", "grass", "grass"],
            "width": [100, 300, 500, 224],
            "height": [150, 200, 224, 224],
        }
    )
    s = metrics.slice_metrics(frame).set_index("slice")
    assert s.loc["size=short_side<180", "accuracy"] == 1.0
    assert s.loc["size=short_side_180-223", "n"] == 1
    assert s.loc["size=short_side_180-223", "accuracy"] == 0.0
    assert s.loc["size=short_side>=224", "n"] == 2
    assert s.loc["orientation=square", "n"] == 1
    assert s.loc["orientation=portrait", "n"] == 1
    assert s.loc["label=dandelion", "accuracy"] == 0.5


def test_evaluate_split_uses_the_serving_path(lite0_predictor: Any, model_env: Any) -> None:
    """On the real backbone's tiny model (the accuracy floor is the real model's)."""
    report = evaluate.evaluate_split(lite0_predictor, model_env.store, model_env.version)
    assert report.metrics["n"] == 60
    assert report.accuracy >= 0.9
    assert set(report.slices["slice"]) >= {"label=dandelion", "label=grass"}
    table = report.table()
    assert "accuracy" in table and "confusion matrix" in table and "ece" in table


@pytest.fixture
def labelled_folder(tmp_path: Path, model_env: Any, test_split: pd.DataFrame) -> Path:
    """A user's folder: 5 test images per label, plus one broken file and one stray file."""
    root = tmp_path / "photos"
    for label in ("dandelion", "grass"):
        (root / label).mkdir(parents=True)
        for i, key in enumerate(test_split[test_split["label"] == label]["key"].head(5)):
            (root / label / f"{i}.jpg").write_bytes(model_env.store.get_bytes(key))
    (root / "grass" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("ignored")
    return root


def test_cli_evaluate_images_prints_the_metrics_table(
    labelled_folder: Path,
    model_env: Any,
    trained: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import Predictor

    monkeypatch.setenv("DANDELION_WORKDIR", str(model_env.settings.storage.workdir))
    get_settings.cache_clear()
    try:
        code = cli.main(
            ["evaluate", "--model", trained.model_uri, "--images", str(labelled_folder)]
        )
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert code == 0
    assert f"model:   {trained.model_uri} (version {trained.model_version})" in out
    assert "(10 images)" in out
    assert "confusion matrix" in out and "slice" in out
    assert "skipped" in out and "broken.jpg" in out
    # The printed accuracy is the one of the serving path on the same files.
    configure_mlflow(model_env.settings)
    predictor = Predictor.load(trained.model_uri, model_env.settings)
    report, skipped = evaluate.evaluate_folder(predictor, labelled_folder)
    assert len(skipped) == 1
    assert f"{'accuracy':<24}{report.accuracy:>10.4f}" in out


def test_cli_evaluate_reports_a_missing_folder_in_one_line(
    model_env: Any, trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings

    monkeypatch.setenv("DANDELION_WORKDIR", str(model_env.settings.storage.workdir))
    get_settings.cache_clear()
    empty = tmp_path / "empty"
    (empty / "grass").mkdir(parents=True)
    try:
        missing = cli.main(
            ["evaluate", "--model", trained.model_uri, "--images", str(tmp_path / "nope")]
        )
        no_images = cli.main(["evaluate", "--model", trained.model_uri, "--images", str(empty)])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert missing == 2 and no_images == 2
    assert err[0] == f"dandelion evaluate: error: image folder not found: {tmp_path / 'nope'}"
    assert "no images in" in err[1] and len(err) == 2


def test_folder_listing_ignores_other_labels(tmp_path: Path) -> None:
    (tmp_path / "dandelion").mkdir()
    (tmp_path / "cats").mkdir()
    shutil.copy(
        Path(__file__).parent / "fixtures" / "tiny_state_dict.pth", tmp_path / "cats" / "a.jpg"
    )
    (tmp_path / "dandelion" / "a.JPG").write_bytes(b"x")
    found = evaluate.list_labelled_folder(tmp_path, LABELS)
    assert found == [(tmp_path / "dandelion" / "a.JPG", "dandelion")]


def test_cli_predict_prints_labels_and_flags_invalid_files(
    tmp_path: Path,
    model_env: Any,
    lite0_trained: Any,
    test_split: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    """On the real backbone's tiny model: the labels printed are the right ones."""
    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings

    rows = test_split.groupby("label").head(1)
    files = []
    for key, label in zip(rows["key"], rows["label"], strict=True):
        path = tmp_path / f"{label}.jpg"
        path.write_bytes(model_env.store.get_bytes(key))
        files.append(str(path))
    bad = tmp_path / "page.jpg"
    bad.write_text("<html>not an image</html>")
    monkeypatch.setenv("DANDELION_WORKDIR", str(model_env.settings.storage.workdir))
    get_settings.cache_clear()
    try:
        code = cli.main(["predict", "--model", lite0_trained.model_uri, *files, str(bad)])
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # one file was not an image
    assert out[-1] == (
        f"{bad}: invalid image (not_an_image): the file is not a supported image; "
        "send JPEG, PNG, WebP, GIF, BMP or TIFF"
    )
    for line, label in zip(out[-3:-1], rows["label"], strict=True):
        assert line.startswith(f"{tmp_path / label}.jpg: {label} (confidence ")


def test_cli_evaluate_with_negatives_reports_the_open_set_figures(
    labelled_folder: Path,
    model_env: Any,
    trained: Any,
    ood_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
) -> None:
    import json

    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings

    negatives = tmp_path / "ood"
    for kind in ("objects", "tulips"):
        (negatives / kind).mkdir(parents=True)
        for photo in sorted((ood_dir / kind).glob("*.jpg"))[-4:]:
            shutil.copy(photo, negatives / kind / photo.name)
    monkeypatch.setenv("DANDELION_WORKDIR", str(model_env.settings.storage.workdir))
    get_settings.cache_clear()
    try:
        args = ["evaluate", "--model", trained.model_uri, "--images", str(labelled_folder)]
        code = cli.main([*args, "--negatives", str(negatives), "--json"])
        alone = cli.main(["evaluate", "--model", trained.model_uri, "--negatives", "x"])
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert code == 0 and alone == 2
    metrics = json.loads(out.splitlines()[0])["metrics"]
    assert metrics["ood_count"] == 8 and metrics["in_domain_count"] == 10
    for key in ("ood_unknown_share_objects", "ood_unknown_share_tulips", "answered_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "--negatives goes with --images" in err
