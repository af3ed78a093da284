"""The promotion gate's rules (dandelion_lib.lifecycle.gate) and the saved scores it reads
(dandelion_lib.lifecycle.scoring, .scorecard, .metrics); promotion on a real registry is tested
in tests/model/test_promote.py and tests/integration/test_train_registry.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from dandelion_lib.core.config import PromotionSettings, Settings
from dandelion_lib.lifecycle import scorecard
from dandelion_lib.lifecycle.agreement import Agreement
from dandelion_lib.lifecycle.gate import judge, promotion_gate, serving_choice, serving_of
from dandelion_lib.lifecycle.metrics import EvaluationReport, classification_metrics
from dandelion_lib.lifecycle.scoring import Scores, Split


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "why"),
    [
        (0.95, None, True, "no champion"),
        (0.89, None, False, "below the floor"),
        (0.90, None, True, "floor"),  # the floor itself passes
        (0.89, 0.50, False, "below the floor"),  # the floor applies even vs a weak champion
        (0.95, 0.96, True, "within"),  # 1 point worse: within tolerance
        (0.94, 0.96, False, "worse than the champion"),
        (0.99, 0.96, True, "within"),
        (float("nan"), None, False, "below the floor"),
    ],
)
def test_promotion_gate(challenger: float, champion: float | None, promote: bool, why: str) -> None:
    d = promotion_gate(challenger, champion, floor=0.90, tolerance=0.01)
    assert d.promote is promote
    assert why in d.reason
    assert d.floor == 0.90 and d.champion_accuracy == champion


@pytest.mark.parametrize(
    ("challenger_ood", "champion_ood", "promote", "why"),
    [
        (0.90, None, True, "no champion"),  # nothing to compare with
        (0.90, 0.95, True, "out-of-domain rejection 0.9000 within 0.0500"),
        (0.89, 0.95, False, "answered 'unknown' 0.8900 is below the champion's 0.9500"),
        (None, 0.95, False, "answered 'unknown' 0.0000"),  # a challenger without a detector
        (0.99, 0.50, True, "within"),
    ],
)
def test_gate_refuses_an_out_of_domain_regression(
    challenger_ood: float | None, champion_ood: float | None, promote: bool, why: str
) -> None:
    d = promotion_gate(
        0.97,
        None if why == "no champion" else 0.97,
        floor=0.90,
        tolerance=0.01,
        challenger_ood_unknown=challenger_ood,
        champion_ood_unknown=champion_ood,
        ood_tolerance=0.05,
    )
    assert d.promote is promote, d.reason
    assert why in d.reason
    assert d.champion_ood_unknown == champion_ood


def test_accuracy_still_decides_first() -> None:
    d = promotion_gate(
        0.80, 0.97, floor=0.90, tolerance=0.01, challenger_ood_unknown=1.0, champion_ood_unknown=0.5
    )
    assert not d.promote and "below the floor" in d.reason


def test_promote_is_the_cli_command() -> None:
    from dandelion_lib.cli import COMMANDS, promote

    assert COMMANDS["promote"][0] == promote.__name__


def _report(accuracy: float, ood: float | None = None, n: int = 4) -> EvaluationReport:
    """A report with the given figures and ``n`` two-class predictions."""
    labels = ("dandelion", "grass")
    probs = np.tile([[0.9, 0.1], [0.2, 0.8]], (n // 2, 1))
    metrics = classification_metrics(np.tile([0, 1], n // 2), probs, labels)
    metrics |= {"accuracy": accuracy, "roc_auc": 0.9}  # the figures under test
    if ood is not None:
        metrics["ood_unknown_share"] = ood
    predictions = pd.DataFrame(
        {
            "label": ["dandelion", "grass"] * (n // 2),
            "predicted": ["dandelion", "grass"] * (n // 2),
            "confidence": [0.9] * n,
            "answer": ["dandelion", "uncertain"] * (n // 2),
            "ood_score": [0.1, np.nan] * (n // 2),
        }
    )
    return EvaluationReport(
        model_uri="models:/dandelion/1",
        model_version="1",
        source="dataset v (test split)",
        labels=labels,
        metrics=metrics,
        slices=pd.DataFrame([{"slice": "label=grass", "n": 2, "accuracy": 1.0}]),
        predictions=predictions,
        probabilities=probs,
    )


PROMOTION = PromotionSettings(int8_tolerance=0.01)


def test_without_an_agreement_int8_is_served_only_within_the_tolerance() -> None:
    """Scores saved before agreement was measured keep the rule of their time."""
    fp32 = _report(0.95, ood=0.9)
    assert serving_choice(fp32, None, PROMOTION).reason == "no INT8 artifact"
    close = serving_choice(fp32, _report(0.945, ood=0.9), PROMOTION)
    assert close.precision == "int8" and "largest difference: accuracy 0.0050" in close.reason
    far = serving_choice(fp32, _report(0.93, ood=0.9), PROMOTION)
    assert far.precision == "fp32" and "INT8 test accuracy 0.9300 differs" in far.reason
    lacking = serving_choice(fp32, _report(0.95), PROMOTION)
    assert lacking.precision == "fp32" and "INT8 lacks ood_unknown_share" in lacking.reason
    assert "serving.int8_agreement" not in close.tags()
    keras = serving_of(fp32, None, keras_reason="no runtime artifact", promotion=PROMOTION)
    assert (keras.runtime, keras.precision) == ("keras", "fp32")
    assert keras.tags()["serving.reason"] == "no runtime artifact"
    assert "serving.int8_accuracy" not in keras.tags()
    assert close.tags()["serving.int8_accuracy"] == "0.945000"


def test_judge_adds_the_champion_note_and_compares_out_of_domain_shares() -> None:
    settings = Settings(promotion_ood_tolerance=0.05)
    d = judge(_report(0.95, ood=0.8), _report(0.95, ood=0.9), settings, floor=0.9, tolerance=0.01)
    assert not d.promote and d.champion_ood_unknown == 0.9 and d.ood_tolerance == 0.05
    assert "answered 'unknown' 0.8000 is below the champion's 0.9000" in d.reason
    d = judge(_report(0.95, ood=0.86), _report(0.95, ood=0.9), settings, floor=0.9, tolerance=0.01)
    assert d.promote and "out-of-domain rejection 0.8600 within 0.0500" in d.reason
    d = judge(_report(0.95), None, settings, floor=0.9, tolerance=0.01, note=" (champion gone)")
    assert d.promote and d.reason.endswith("no champion (champion gone)")


def _scores(bench: str | None, **changes: Any) -> Scores:
    fields: dict[str, Any] = {
        "version": "3",
        "dataset_version": "v2",
        "serving_runtime": "auto",
        "runtime": "onnx",
        "runtime_note": None,
        "fp32": _report(0.95, ood=0.9),
        "int8": _report(0.945, ood=0.9),
        "benchmark_version": bench,
    }
    return Scores(**(fields | changes))


def test_saved_scores_hold_only_for_their_split_benchmark_and_precision() -> None:
    same = _scores("v2")
    assert same.holds(Split(None, "v2", "v2"), "auto", "int8")
    assert same.benchmark_report("int8") is same.int8
    assert not same.holds(Split(None, "v3", "v2"), "auto", "int8")  # another test split
    assert not same.holds(Split(None, "v2", "v2"), "keras", "int8")
    other = _scores("v1", benchmark=_report(0.9), benchmark_precision="int8")
    assert other.holds(Split(None, "v2", "v1"), "auto", "int8")
    assert not other.holds(Split(None, "v2", "v1"), "auto", "fp32")  # scored as INT8
    assert not other.holds(Split(None, "v2", "v0"), "auto", "int8")  # a pinned benchmark


def test_scores_come_back_from_their_record_unchanged() -> None:
    import json

    measured = _scores("v2", agreement=Agreement(900, 899, 0.012, {"test": (60, 60)}))
    back = Scores.from_record(json.loads(json.dumps(measured.to_record())))
    assert back.agreement == measured.agreement
    assert back.serving(PROMOTION).precision == "int8"
    old = measured.to_record()
    del old["agreement"]  # saved before agreement was measured: today's rule
    assert Scores.from_record(old).agreement is None
    scores = _scores("v1", benchmark=_report(0.9), benchmark_precision="fp32", int8=None)
    record = json.loads(json.dumps(scores.to_record()))
    back = Scores.from_record(record)
    assert back.fp32.metrics == scores.fp32.metrics and back.int8 is None
    assert back.benchmark is not None and back.benchmark.accuracy == 0.9
    assert back.fp32.table() == scores.fp32.table()
    np.testing.assert_array_equal(back.fp32.probabilities, scores.fp32.probabilities)
    assert back.fp32.predictions["answer"].tolist() == ["dandelion", "uncertain"] * 2
    assert back.fp32.true_indices().tolist() == [0, 1, 0, 1]
    assert back.serving(PROMOTION).precision == "fp32"  # no INT8 artifact
    assert scorecard.headline(record, "int8") == {
        "right_answers": None,
        "accuracy": 0.95,
        "ood_unknown_share": 0.9,
        "max_source_unknown_share": None,
    }
    keras = _scores(None, runtime="keras", runtime_note=None)
    assert keras.serving(PROMOTION).reason == "serving_runtime is auto"
