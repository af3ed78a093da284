"""The Predictor's answer policy (dandelion_lib.predict.AnswerPolicy): one place decides a
label, ``uncertain`` or ``unknown``; the model itself is exercised in tests/model."""

from __future__ import annotations

import pytest

from dandelion_lib.config import UNCERTAIN, UNKNOWN, Settings
from dandelion_lib.predict import (
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

    from dandelion_lib.features import FeatureSpec
    from dandelion_lib.openset import OpenSetDetector
    from dandelion_lib.predict import Predictor

    rng = np.random.default_rng(0)
    det = OpenSetDetector(method="mahalanobis").fit(rng.normal(size=(40, 4)), np.repeat([0, 1], 20))
    det.calibrate(rng.normal(size=(20, 4)), 0.9)
    p = Predictor(model=None, spec=FeatureSpec(), detector=det, policy=AnswerPolicy(0.7))
    assert p.policy.ood_threshold == det.threshold and p.policy.threshold == 0.7
    # an explicit policy threshold is kept
    fixed = AnswerPolicy(0.7, ood_threshold=1.5)
    assert Predictor(model=None, spec=FeatureSpec(), detector=det, policy=fixed).policy == fixed
