"""The Predictor's answer policy (dandelion_lib.serving.predict.AnswerPolicy): one place decides a
label, ``uncertain`` or ``unknown``; the model itself is exercised in tests/model. Also what
``Predictor.load`` says about a model version whose stored model file is broken."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dandelion_lib.core.config import UNCERTAIN, UNKNOWN, Settings
from dandelion_lib.serving.predict import (
    LOW_CONFIDENCE,
    OUT_OF_DOMAIN,
    Answer,
    AnswerPolicy,
    Prediction,
)


def prediction(confidence: float, ood_score: float | None = None) -> Prediction:
    other = 1.0 - confidence
    return Prediction(
        "dandelion", {"dandelion": confidence, "grass": other}, confidence, ood_score=ood_score
    )


@pytest.mark.parametrize(
    ("confidence", "answer"),
    [(0.95, "dandelion"), (0.6, "dandelion"), (0.59, UNCERTAIN), (0.5, UNCERTAIN)],
)
def test_threshold_decides_uncertain(confidence: float, answer: str) -> None:
    assert AnswerPolicy(threshold=0.6).answer(prediction(confidence)) == answer


def test_policy_comes_from_settings() -> None:
    assert AnswerPolicy() == AnswerPolicy.from_settings(Settings())
    strict = AnswerPolicy.from_settings(Settings(confidence_threshold=0.99))
    assert strict.answer(prediction(0.95)) == UNCERTAIN
    # No detector threshold (a model without a detector): the score changes nothing.
    assert strict.answer(prediction(0.995, ood_score=1e9)) == "dandelion"


@pytest.mark.parametrize(
    ("confidence", "ood_score", "expected"),
    [
        (0.99, 0.5, Answer("dandelion")),
        (0.99, 2.0, Answer("dandelion")),  # the threshold itself is still in-domain
        (0.99, 2.0001, Answer(UNKNOWN, OUT_OF_DOMAIN)),  # confident but out of domain
        (0.55, 5.0, Answer(UNKNOWN, OUT_OF_DOMAIN)),  # unknown wins over uncertain
        (0.55, 0.0, Answer(UNCERTAIN, LOW_CONFIDENCE)),
        (0.55, None, Answer(UNCERTAIN, LOW_CONFIDENCE)),  # no score: never unknown
        (0.99, None, Answer("dandelion")),
        (float("nan"), 0.0, Answer(UNCERTAIN, LOW_CONFIDENCE)),
    ],
)
def test_unknown_then_uncertain_then_label(
    confidence: float, ood_score: float | None, expected: Answer
) -> None:
    policy = AnswerPolicy(threshold=0.6, ood_threshold=2.0)
    assert policy.decide(prediction(confidence, ood_score)) == expected
    assert policy.answer(prediction(confidence, ood_score)) == expected.label


def test_predictor_takes_its_detectors_threshold() -> None:
    import numpy as np

    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.serving.predict import Predictor
    from dandelion_lib.training.openset import OpenSetDetector

    rng = np.random.default_rng(0)
    det = OpenSetDetector(method="mahalanobis").fit(rng.normal(size=(40, 4)), np.repeat([0, 1], 20))
    det.calibrate(rng.normal(size=(20, 4)), 0.9)
    p = Predictor(model=None, spec=FeatureSpec(), detector=det, policy=AnswerPolicy(0.7))
    assert p.policy.ood_threshold == det.threshold and p.policy.threshold == 0.7
    # an explicit policy threshold is kept
    fixed = AnswerPolicy(0.7, ood_threshold=1.5)
    assert Predictor(model=None, spec=FeatureSpec(), detector=det, policy=fixed).policy == fixed


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow Keras model folder (a tiny model; no registry needed)."""
    import keras
    import mlflow

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    path = tmp_path_factory.mktemp("saved") / "model"
    mlflow.keras.save_model(model, str(path), pip_requirements=["keras"])
    return path


def _broken_copy(src: Path, dst: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    (keras_file,) = dst.rglob("model.keras")
    damage(keras_file)
    return dst


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [_truncate, lambda p: p.write_bytes(b"this is not a keras archive")],
    ids=["truncated", "garbage"],
)
def test_a_corrupt_model_file_is_reported_as_corrupt(
    saved_model_dir: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    from dandelion_lib.serving.predict import ModelUnavailableError, Predictor

    assert Predictor.load(str(saved_model_dir)).labels  # the intact copy loads
    broken = _broken_copy(saved_model_dir, tmp_path / "broken", damage)
    with pytest.raises(ModelUnavailableError) as info:
        Predictor.load(str(broken))
    first = str(info.value).splitlines()[0]
    assert re.search(r"model\.keras is corrupt", first), first
    assert "not found" not in first.lower()


def test_a_missing_model_file_is_reported_as_missing(saved_model_dir: Path, tmp_path: Path) -> None:
    from dandelion_lib.serving.predict import ModelUnavailableError, Predictor

    broken = _broken_copy(saved_model_dir, tmp_path / "broken", Path.unlink)
    with pytest.raises(ModelUnavailableError, match="missing"):
        Predictor.load(str(broken))
