"""The open-set detector as shipped: fitted and calibrated by ``train()``, logged in the MLflow
model beside the Keras model, loaded back by the Predictor, scored on the served features,
and measured by evaluation (the tiny shared model of tests/model/conftest.py, trained on a
dataset version whose ``negatives`` source is ood-dev)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.lifecycle import evaluate
from dandelion_lib.serving.loading import ModelUnavailableError
from dandelion_lib.serving.predict import OUT_OF_DOMAIN, Predictor
from dandelion_lib.training.openset import ARTIFACT_NAME, OpenSetDetector


def test_negatives_are_a_source_of_their_own(model_env: Any, ood_dir: Path) -> None:
    m = model_env.manifest
    neg = m[m["label"] == UNKNOWN]
    assert len(neg) == len(list(ood_dir.glob("*/*.jpg")))
    assert set(neg["split"]) == {"train", "test"}  # fit / evaluation only, never val
    assert all(Path(s).is_relative_to(ood_dir) for s in neg["source"])  # provenance
    assert all(k.startswith("raw/unknown/") for k in neg["key"])
    # stratified by kind: every folder has photos on both sides
    kinds = neg.assign(kind=[Path(s).parent.name for s in neg["source"]])
    assert (kinds.groupby("kind")["split"].nunique() == 2).all()


def test_detector_travels_with_the_model(
    trained: Any, predictor: Predictor, mlflow_client: Any, tmp_path: Path
) -> None:
    import mlflow

    det = predictor.detector
    assert det is not None and det.method == "logistic"  # negatives in the dataset
    assert det.retention == 0.97 and det.calibration_size == 60  # the val split
    local = Path(mlflow.artifacts.download_artifacts(trained.model_uri, dst_path=str(tmp_path)))
    assert (local / ARTIFACT_NAME).is_file()
    meta = mlflow.models.Model.load(str(local)).metadata
    assert meta["openset"] == det.to_dict()
    run = mlflow_client.get_run(trained.run_id)
    assert run.data.metrics["openset_threshold"] == pytest.approx(det.threshold)
    assert run.data.params["openset_method_resolved"] == "logistic"
    assert predictor.policy.ood_threshold == det.threshold


def test_served_score_is_the_detectors_score_on_served_features(
    predictor: Predictor, ood_dir: Path, test_split: Any, model_env: Any
) -> None:
    from dandelion_lib.data.dataset import load_examples

    photos = [p.read_bytes() for p in sorted(ood_dir.glob("objects/*.jpg"))[:3]]
    pixels = np.concatenate(
        [
            np.stack([predictor.decode(b)[0] for b in photos]),
            load_examples(model_env.store, test_split.head(3), predictor.spec).astype(np.float32),
        ]
    )
    preds = predictor.predict_arrays(pixels)
    assert predictor.detector is not None
    expected = predictor.detector.score(predictor.features(pixels))
    np.testing.assert_allclose([p.ood_score for p in preds], expected, rtol=1e-5, atol=1e-5)


def test_open_set_figures_are_logged_and_evaluated(
    trained: Any, predictor: Predictor, model_env: Any, mlflow_client: Any
) -> None:
    metrics = mlflow_client.get_run(trained.run_id).data.metrics
    for key in (
        "test_ood_roc_auc",
        "test_ood_unknown_share",
        "test_ood_unknown_share_objects",
        "test_ood_unknown_share_daisy",
        "test_ood_unknown_share_hard",
        "test_in_domain_unknown_share",
        "test_answered_accuracy",
    ):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0
    # The tiny model still separates the two kinds of photo clearly.
    assert metrics["test_ood_roc_auc"] > 0.8
    # Training scores the whole test split of the dataset version (the tiny model trains on
    # a subset of it), as the promotion gate reads it; re-scored here from the registered model.
    m = model_env.manifest
    negatives = ((m["label"] == UNKNOWN) & (m["split"] == "test")).sum()
    assert metrics["test_ood_count"] == negatives
    report = evaluate.evaluate_split(predictor, model_env.store, model_env.version)
    assert report.metrics["ood_count"] == negatives
    assert report.metrics["ood_unknown_share"] == pytest.approx(metrics["test_ood_unknown_share"])
    assert report.metrics["ood_roc_auc"] > 0.8
    assert 0.0 <= report.metrics["ood_unknown_share"] <= 1.0
    answers = report.predictions["answer"]
    assert set(answers) <= {"dandelion", "grass", "uncertain", UNKNOWN}
    assert "open set" in report.table()


def test_an_everyday_object_is_unknown_and_says_why(
    lite0_predictor: Predictor, ood_dir: Path
) -> None:
    """Most clear everyday objects are out of domain even for the tiny model (the real
    backbone's: a quality of the real model); each one it answers ``unknown`` carries the
    reason and a score above the threshold."""
    predictor = lite0_predictor
    photos = sorted(ood_dir.glob("objects/*.jpg"))[::10]
    preds = predictor.predict_bytes([p.read_bytes() for p in photos])
    answers = [predictor.decide(p) for p in preds]
    unknown = [a for a in answers if a.label == UNKNOWN]
    assert len(unknown) >= len(photos) // 2, [p.ood_score for p in preds]
    assert all(a.reason == OUT_OF_DOMAIN for a in unknown)
    threshold = predictor.policy.ood_threshold
    assert threshold is not None
    for pred, answer in zip(preds, answers, strict=True):
        assert (answer.label == UNKNOWN) == (
            pred.ood_score is not None and pred.ood_score > threshold
        )


def test_a_model_missing_its_detector_file_is_refused(trained: Any, tmp_path: Path) -> None:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(trained.model_uri, dst_path=str(tmp_path)))
    broken = tmp_path / "broken"
    shutil.copytree(local, broken)
    (broken / ARTIFACT_NAME).unlink()
    with pytest.raises(ModelUnavailableError, match=r"openset\.npz is missing"):
        Predictor.load(str(broken), Settings())
    (broken / ARTIFACT_NAME).write_bytes(b"not an npz")
    with pytest.raises(ModelUnavailableError, match="open-set detector"):
        Predictor.load(str(broken), Settings())


def test_detector_file_round_trips(predictor: Predictor, tmp_path: Path) -> None:
    assert predictor.detector is not None
    again = OpenSetDetector.load(predictor.detector.save(tmp_path / ARTIFACT_NAME))
    x = np.random.default_rng(0).normal(size=(4, predictor.detector.dim or 0))
    np.testing.assert_allclose(again.score(x), predictor.detector.score(x), rtol=1e-6)
