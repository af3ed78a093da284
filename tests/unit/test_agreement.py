"""INT8 judged by its agreement with FP32 (dandelion_lib.lifecycle.agreement) and the rule
the gate applies to it (dandelion_lib.lifecycle.gate.serving_choice)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from dandelion_lib.core.config import PromotionSettings
from dandelion_lib.lifecycle import agreement as agreement_lib
from dandelion_lib.lifecycle.agreement import (
    Agreement,
    comparison_rows,
    measure_agreement,
    wilson_lower_bound,
)
from dandelion_lib.lifecycle.gate import figure_tolerance, serving_choice
from dandelion_lib.lifecycle.metrics import EvaluationReport, classification_metrics
from dandelion_lib.serving.predict import AnswerPolicy, Prediction

PROMOTION = PromotionSettings()  # int8_min_agreement 0.99, max diff 0.1, tolerance 0.01


def test_wilson_lower_bound() -> None:
    assert wilson_lower_bound(0, 0) == 0.0
    assert wilson_lower_bound(60, 60) == pytest.approx(0.9568, abs=1e-4)
    assert wilson_lower_bound(899, 900) == pytest.approx(0.9950, abs=1e-4)
    assert wilson_lower_bound(900, 900) == pytest.approx(0.9970, abs=1e-4)
    assert wilson_lower_bound(0, 10) == 0.0
    # below the share, and closer to it with more photos
    assert wilson_lower_bound(99, 100) < wilson_lower_bound(990, 1000) < 0.99
    # the default: with 900 photos, 4 differing answers pass 0.99, 5 do not
    assert wilson_lower_bound(896, 900) >= 0.99 > wilson_lower_bound(895, 900)
    # a stricter z gives a lower bound
    assert wilson_lower_bound(95, 100, z=2.0) < wilson_lower_bound(95, 100)
    with pytest.raises(ValueError, match="between 0"):
        wilson_lower_bound(11, 10)


def test_agreement_comes_back_from_its_record() -> None:
    a = Agreement(900, 899, 0.0123, {"test": (60, 60), "negatives": (148, 147)})
    data = json.loads(json.dumps(a.to_dict()))
    assert data["share"] == pytest.approx(899 / 900)
    assert data["lower_bound"] == pytest.approx(a.lower_bound)
    assert data["parts"]["negatives"] == {"photos": 148, "identical": 147}
    assert Agreement.from_dict(data) == a
    assert Agreement.from_dict({"photos": 0, "identical": 0, "max_probability_diff": 0}).share == 0
    assert a.differing == 1 and "899 of 900 photos" in a.describe()


def _manifest() -> pd.DataFrame:
    rows = [
        ("t2", "test", "grass"),
        ("t1", "test", "dandelion"),
        ("v1", "val", "grass"),
        ("r1", "train", "dandelion"),
        ("n2", "test", "unknown"),
        ("n1", "train", "unknown"),
    ]
    frame = pd.DataFrame(rows, columns=["sha256", "split", "label"])
    return frame.assign(key=[f"raw/{s}" for s in frame["sha256"]], source="x")


def test_photos_are_compared_test_split_first_then_negatives_val_and_train() -> None:
    rows = comparison_rows(_manifest(), 100)
    assert rows["sha256"].tolist() == ["t1", "t2", "n1", "n2", "v1", "r1"]
    assert rows["part"].tolist() == ["test", "test", "negatives", "negatives", "val", "train"]
    assert comparison_rows(_manifest(), 3)["sha256"].tolist() == ["t1", "t2", "n1"]
    assert comparison_rows(_manifest(), 0).empty


class _Fake:
    """A predictor whose probability of 'dandelion' is read from the input's first pixel."""

    labels = ("dandelion", "grass")
    spec = None

    def __init__(self, shift: dict[int, float]) -> None:
        self.shift = shift
        self.policy = AnswerPolicy(threshold=0.7)

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        out = []
        for x in batch:
            i = int(x[0, 0, 0])
            p = 0.9 - 0.05 * (i % 2) + self.shift.get(i, 0.0)
            probs = {"dandelion": p, "grass": 1 - p}
            out.append(Prediction("dandelion", probs, max(p, 1 - p)))
        return out


def _load_photo_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model inputs whose pixels hold the photo's number in the order photos are compared
    (t1 0, t2 1, n1 2, n2 3, v1 4, r1 5), which the fakes read back."""
    order = {sha: i for i, sha in enumerate(["t1", "t2", "n1", "n2", "v1", "r1"])}

    def load(store: Any, rows: pd.DataFrame, spec: Any = None) -> np.ndarray:
        return np.stack([np.full((2, 2, 3), order[s], dtype=np.uint8) for s in rows["sha256"]])

    monkeypatch.setattr(agreement_lib.dataset, "load_examples", load)


def test_measure_agreement_compares_answers_and_probabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _load_photo_numbers(monkeypatch)
    monkeypatch.setattr(agreement_lib, "CHUNK", 4)  # two chunks
    # photo 2 (n1) crosses the 0.7 threshold in INT8: 'uncertain' instead of 'dandelion'
    int8 = _Fake({2: -0.25, 5: 0.01})
    a = measure_agreement(_Fake({}), int8, None, _manifest(), limit=100)
    assert (a.photos, a.identical) == (6, 5)
    assert a.max_probability_diff == pytest.approx(0.25)
    assert a.parts == {"test": (2, 2), "negatives": (2, 1), "val": (1, 1), "train": (1, 1)}
    limited = measure_agreement(_Fake({}), int8, None, _manifest(), limit=2)
    assert (limited.photos, limited.identical, limited.parts) == (2, 2, {"test": (2, 2)})
    assert limited.max_probability_diff == 0.0


def _report(correct: int, n: int = 60, ood: float | None = None) -> EvaluationReport:
    """A test-split report of ``n`` balanced photos, ``correct`` of them right."""
    labels = ("dandelion", "grass")
    y = np.tile([0, 1], n // 2)
    probs = np.tile([[0.9, 0.1], [0.2, 0.8]], (n // 2, 1))
    probs[: n - correct] = probs[: n - correct, ::-1]  # the first photos wrong
    metrics = classification_metrics(y, probs, labels) | {"roc_auc": 0.95}
    if ood is not None:
        metrics |= {"ood_unknown_share": ood, "ood_count": 30.0}
    return EvaluationReport(
        model_uri=None,
        model_version="1",
        source="dataset v (test split)",
        labels=labels,
        metrics=metrics,
        slices=pd.DataFrame(columns=["slice", "n", "accuracy"]),
        predictions=pd.DataFrame({"label": [labels[i] for i in y]}),
        probabilities=probs,
    )


AGREES = Agreement(900, 899, 0.012)


def test_int8_is_served_when_it_agrees_with_fp32() -> None:
    choice = serving_choice(_report(57), _report(57), PROMOTION, AGREES)
    assert choice.precision == "int8", choice.reason
    assert choice.reason.startswith(
        "INT8 answers 899 of 900 photos as FP32 (lower bound 0.9950 >= 0.99), "
        "largest probability difference 0.012"
    )
    tags = choice.tags()
    assert tags["serving.int8_agreement"] == str(round(899 / 900, 6))
    assert tags["serving.int8_agreement_lower_bound"] == str(round(AGREES.lower_bound, 6))
    assert tags["serving.int8_agreement_photos"] == "900"
    assert tags["serving.int8_max_probability_diff"] == "0.012"
    assert tags["serving.int8_test_tolerance"] == "0.025000"  # 1.5 / 60 photos
    assert tags["serving.int8_accuracy"] == "0.950000"


def test_int8_is_refused_when_the_lower_bound_falls_short() -> None:
    # 890 of 900 is 98.9 %: its lower bound 0.982 is below 0.99
    choice = serving_choice(_report(57), _report(57), PROMOTION, Agreement(900, 890, 0.01))
    assert choice.precision == "fp32"
    assert "INT8 answers 890 of 900 photos as FP32: lower bound 0.98" in choice.reason
    # all photos agree, but 60 photos cannot show 99 %
    few = serving_choice(_report(57), _report(57), PROMOTION, Agreement(60, 60, 0.0))
    assert few.precision == "fp32" and "lower bound 0.9568 < 0.99" in few.reason
    assert few.tags()["serving.int8_agreement_photos"] == "60"
    none = serving_choice(_report(57), _report(57), PROMOTION, Agreement(0, 0, 0.0))
    assert none.precision == "fp32" and "no photo" in none.reason


def test_int8_is_refused_when_a_probability_moves_too_far() -> None:
    choice = serving_choice(_report(57), _report(57), PROMOTION, Agreement(900, 900, 0.15))
    assert choice.precision == "fp32"
    assert "differ from FP32's by up to 0.150 > 0.1" in choice.reason
    lenient = PromotionSettings(int8_max_probability_diff=0.2)
    passes = serving_choice(_report(57), _report(57), lenient, Agreement(900, 900, 0.15))
    assert passes.precision == "int8"


def test_one_flipped_photo_on_a_small_split_no_longer_decides() -> None:
    fp32 = _report(57)  # 60 photos: 0.95
    one = _report(56)  # one photo more wrong: 0.9333, 1.7 points
    three = _report(54)  # three photos: 5 points
    assert serving_choice(fp32, one, PROMOTION).precision == "fp32"  # the old rule
    assert serving_choice(fp32, one, PROMOTION, AGREES).precision == "int8"
    refused = serving_choice(fp32, three, PROMOTION, AGREES)
    assert refused.precision == "fp32"
    assert "INT8 test accuracy 0.9000 differs from FP32's 0.9500 by more than 0.025" in (
        refused.reason
    )
    # a large split: the tolerance setting itself applies
    assert figure_tolerance(_report(570, n=600), "accuracy", 0.01) == 0.01
    assert figure_tolerance(fp32, "accuracy", 0.01) == pytest.approx(0.025)
    # ROC AUC counts the smallest class; the out-of-domain share its own photos
    assert figure_tolerance(fp32, "roc_auc", 0.01) == pytest.approx(0.05)
    assert figure_tolerance(_report(57, ood=0.9), "ood_unknown_share", 0.01) == 0.05


def test_one_out_of_domain_photo_does_not_decide_either() -> None:
    fp32 = _report(57, ood=0.9)  # 27 of 30 negatives answered 'unknown'
    assert serving_choice(fp32, _report(57, ood=26 / 30), PROMOTION, AGREES).precision == "int8"
    refused = serving_choice(fp32, _report(57, ood=24 / 30), PROMOTION, AGREES)
    assert refused.precision == "fp32" and "ood_unknown_share" in refused.reason


class _FakeOpenSet(_Fake):
    """:class:`_Fake` with an out-of-domain score: photo 3 (``n2``) is out of domain."""

    def __init__(self, shift: dict[int, float]) -> None:
        super().__init__(shift)
        self.policy = AnswerPolicy(threshold=0.7, ood_threshold=1.0)

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        out = super().predict_arrays(batch)
        return [
            dataclasses.replace(p, ood_score=5.0 if int(x[0, 0, 0]) == 3 else 0.0)
            for x, p in zip(batch, out, strict=True)
        ]


def test_probabilities_of_a_photo_answered_unknown_do_not_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _load_photo_numbers(monkeypatch)
    # n2 is 'unknown' in both precisions: its probabilities may move, its answer does not
    a = measure_agreement(
        _FakeOpenSet({}), _FakeOpenSet({3: -0.4, 5: 0.02}), None, _manifest(), limit=100
    )
    assert (a.photos, a.identical) == (6, 6)
    assert a.max_probability_diff == pytest.approx(0.02)


class _Counting(_Fake):
    """:class:`_Fake` that records the photos it is run on."""

    def __init__(self, shift: dict[int, float]) -> None:
        super().__init__(shift)
        self.seen: list[int] = []

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        self.seen += [int(x[0, 0, 0]) for x in batch]
        return super().predict_arrays(batch)


def _test_split_report(predictor: _Fake, shas: list[str], numbers: list[int]) -> EvaluationReport:
    """``predictor``'s report on the given test photos, as evaluation writes it."""
    preds = predictor.predict_arrays(
        np.stack([np.full((2, 2, 3), n, dtype=np.uint8) for n in numbers])
    )
    probs = np.asarray([[p.probabilities[lab] for lab in predictor.labels] for p in preds])
    answers = [predictor.policy.decide(p).label for p in preds]
    return EvaluationReport(
        model_uri=None,
        model_version=None,
        source="dataset v (test split)",
        labels=predictor.labels,
        metrics={},
        slices=pd.DataFrame(),
        predictions=pd.DataFrame({"sha256": shas, "answer": answers}),
        probabilities=probs,
    )


def test_photos_answered_in_the_test_reports_are_not_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _load_photo_numbers(monkeypatch)
    # t2 (photo 1) moves by 0.3 in INT8 and crosses the threshold; n1 (photo 2) moves by 0.25
    shifts = {1: -0.3, 2: -0.25}
    fresh = measure_agreement(_Fake({}), _Fake(shifts), None, _manifest(), limit=100)
    fp32, int8 = _Counting({}), _Counting(shifts)
    answered = agreement_lib.answered_in_reports(
        _test_split_report(_Fake({}), ["t1", "t2"], [0, 1]),
        _test_split_report(_Fake(shifts), ["t1", "t2"], [0, 1]),
        fp32.policy.unknown,
    )
    assert answered.identical == {"t1": True, "t2": False}
    reused = measure_agreement(fp32, int8, None, _manifest(), limit=100, answered=answered)
    assert reused == fresh
    assert (reused.photos, reused.identical) == (6, 4)
    assert reused.max_probability_diff == pytest.approx(0.3)
    assert fp32.seen == int8.seen == [2, 3, 4, 5]  # the test split was not run again
    # reports on other photos than each other's are not used
    other = _test_split_report(_Fake(shifts), ["t2", "t1"], [1, 0])
    mismatched = agreement_lib.answered_in_reports(
        _test_split_report(_Fake({}), ["t1", "t2"], [0, 1]), other, "unknown"
    )
    assert mismatched == agreement_lib.Answered()
