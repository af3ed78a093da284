"""Right answers per source, the detector's floor and the gate's rules for users (pure figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dandelion_lib.lifecycle.gate import MIN_REFUSED, user_verdict
from dandelion_lib.lifecycle.metrics import answer_metrics
from dandelion_lib.training import openset

LABELS = ("dandelion", "grass")


def _frame() -> tuple[pd.DataFrame, np.ndarray]:
    frame = pd.DataFrame(
        {
            "origin": ["greenr"] * 4 + ["mine"] * 4,
            "label": ["dandelion", "grass", "dandelion", "grass"] * 2,
            "predicted": ["dandelion", "grass", "dandelion", "dandelion"] * 2,
            "answer": [
                *("dandelion", "grass", "uncertain", "dandelion"),
                *("unknown", "unknown", "dandelion", "grass"),
            ],
        }
    )
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.7, 0.3]] * 2)
    return frame, probs


def test_right_answers_count_uncertain_and_unknown_as_not_right() -> None:
    frame, probs = _frame()
    m = answer_metrics(frame, probs, LABELS, unknown="unknown", uncertain="uncertain")
    # the answer is what counts: rows 0, 1, 6 and 7 are right
    assert m["right_answers"] == pytest.approx(4 / 8)
    greenr, mine = m["by_source"]["greenr"], m["by_source"]["mine"]
    assert greenr["right_answers"] == pytest.approx(0.5)
    assert greenr["accuracy"] == pytest.approx(0.75)
    assert greenr["uncertain_share"] == pytest.approx(0.25)
    assert greenr["unknown_share"] == 0.0
    assert mine["unknown_share"] == pytest.approx(0.5)
    assert m["max_source_unknown_share"] == pytest.approx(0.5)
    assert m["source_mine_unknown_share"] == pytest.approx(0.5)
    assert m["source_greenr_n"] == 4.0


def test_without_origin_only_overall_right_answers() -> None:
    frame, probs = _frame()
    m = answer_metrics(
        frame.drop(columns="origin"), probs, LABELS, unknown="unknown", uncertain="uncertain"
    )
    assert set(m) == {"right_answers"}


def test_floor_keeps_the_threshold_from_falling_below_it() -> None:
    rng = np.random.default_rng(0)
    inside = rng.normal(0.0, 1.0, (80, 8))
    negatives = rng.normal(3.0, 1.0, (40, 8))
    det = openset.OpenSetDetector(method="logistic").fit(
        inside, np.zeros(80, dtype=int), negatives=negatives
    )
    val = rng.normal(0.0, 1.0, (30, 8))
    plain = det.calibrate(val, 0.97)
    floored = det.calibrate(val, 0.97, floor=plain + 5.0)
    assert floored == pytest.approx(plain + 5.0)
    assert det.floor == pytest.approx(plain + 5.0)
    back = openset.OpenSetDetector.from_arrays(det.to_arrays())
    assert back.floor == det.floor and back.threshold == det.threshold


def test_floor_is_higher_with_one_source_and_only_for_logistic() -> None:
    assert openset.score_floor("logistic", 1) > openset.score_floor("logistic", 2)  # type: ignore[operator]
    assert openset.score_floor("mahalanobis", 1) is None


def test_gate_refuses_a_source_with_refusals_above_the_setting() -> None:
    ok, reason = user_verdict({"greenr": (0.0, 0), "mine": (0.1, 3)}, 0.03, (0.95, None), 0.01)
    assert not ok and "'mine'" in reason


def test_one_refused_photo_on_a_small_test_part_does_not_fail() -> None:
    assert MIN_REFUSED == 2
    ok, _ = user_verdict({"mine": (1 / 29, 1)}, 0.03, (0.97, None), 0.01)
    assert ok


def test_gate_refuses_right_answers_below_the_champion() -> None:
    ok, reason = user_verdict({}, 0.03, (0.95, 0.98), 0.01)
    assert not ok and "right answers" in reason
    ok, reason = user_verdict({}, 0.03, (0.975, 0.98), 0.01)
    assert ok and "right answers 0.9750" in reason
