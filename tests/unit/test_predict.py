"""The Predictor's answer policy (dandelion_lib.predict.AnswerPolicy): one place decides a
label or ``uncertain``; the model itself is exercised in tests/model."""

from __future__ import annotations

import pytest

from dandelion_lib.config import UNCERTAIN, Settings
from dandelion_lib.predict import AnswerPolicy, Prediction


def prediction(confidence: float) -> Prediction:
    other = 1.0 - confidence
    return Prediction("dandelion", {"dandelion": confidence, "grass": other}, confidence)


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
    # The out-of-domain score has no rule yet: it does not change the answer.
    assert strict.answer(prediction(0.995), ood_score=1.0) == "dandelion"
