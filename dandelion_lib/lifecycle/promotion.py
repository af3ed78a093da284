"""Promotion: scoring -> the gate -> recording the decision, the one place that moves the
``champion`` alias.

1. Scoring (:mod:`dandelion_lib.lifecycle.scoring`): the ``challenger``'s reports on a test
   split, FP32 and (when it has one) INT8, and on the frozen benchmark (the store's first
   version's test split, logged beside it, not gated): the scores saved with its run by the
   DAG's ``evaluate`` step, else scored now and saved. The current ``champion``, as served, on
   the same test split: its own saved scores when they are for that split, else scored now.
2. The gate (:mod:`dandelion_lib.lifecycle.gate`, no I/O): :func:`gate.serving_of` picks the
   precision (INT8 only when it answers the dataset version's photos as FP32 does, by the
   ``int8_min_agreement`` lower bound and ``int8_max_probability_diff``, and its test figures
   do not drop beyond ``max(int8_tolerance, 1.5 / n)``) and
   :func:`gate.judge` decides on the challenger as it will be served (accuracy floor,
   tolerance versus the champion, and no regression in how many of the split's out-of-domain
   photos are answered ``unknown``).
3. Recording (:func:`record`): an MLflow run with the figures, ``promotion.*`` and
   ``serving.*`` tags on the challenger's model version, and, when it passes, the
   ``champion`` alias moves. Nothing else moves it.

Notebook 03, the DAG's ``promote`` step and ``dandelion promote`` all call :func:`promote`;
training only registers a ``challenger``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.storage import open_store
from dandelion_lib.lifecycle import gate, scoring
from dandelion_lib.lifecycle.figures import log_report
from dandelion_lib.lifecycle.gate import GateDecision, ServingChoice, tag_value
from dandelion_lib.lifecycle.metrics import EvaluationReport
from dandelion_lib.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    configure_mlflow,
    get_alias_version,
    logged_dataset_version,
    use_experiment,
)

TAG_PREFIX = "promotion."


class PromotionError(DandelionError):
    """Promotion cannot be decided (no challenger, no dataset version...)."""


@dataclass
class PromotionResult:
    name: str
    challenger_version: str
    champion_version_before: str | None
    champion_version_after: str | None
    dataset_version: str
    decision: GateDecision
    run_id: str | None = None
    challenger_report: EvaluationReport | None = field(default=None, repr=False)
    champion_report: EvaluationReport | None = field(default=None, repr=False)
    benchmark_version: str | None = None
    """The dataset version whose test split is the frozen benchmark (logged, not gated)."""
    challenger_benchmark: EvaluationReport | None = field(default=None, repr=False)
    champion_benchmark: EvaluationReport | None = field(default=None, repr=False)
    serving: ServingChoice | None = None
    """The runtime and precision the challenger was judged (and will be served) with."""

    @property
    def promoted(self) -> bool:
        return self.decision.promote

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        champ = self.champion_version_after or "none"
        served = ""
        if self.serving is not None:
            served = (
                f" Judged as served: {self.serving.runtime} {self.serving.precision} "
                f"({self.serving.reason})."
            )
        return (
            f"{verdict}: {self.name} version {self.challenger_version} on dataset "
            f"{self.dataset_version}: {self.decision.reason}. Champion is now version {champ}."
            + served
        )


def promote(
    settings: Settings,
    *,
    candidate_alias: str = CHALLENGER,
    dataset_version: str | None = None,
    store: Any = None,
    floor: float | None = None,
    tolerance: float | None = None,
) -> PromotionResult:
    """Score the candidate and the current champion on the same test split (or read their
    saved scores), apply the gate, record the decision as model-version tags and, if it
    passes, move ``champion``.

    The test split is the one of ``dataset_version`` (default: the candidate's own
    training dataset version). A champion that cannot be loaded or scored any more is
    recorded as such and the gate then applies the floor only.
    """
    client = configure_mlflow(settings)
    name = settings.tracking.model_name
    candidate = get_alias_version(client, name, candidate_alias)
    if candidate is None:
        raise PromotionError(
            f"no version of model {name!r} has the alias {candidate_alias!r}; train one first"
        )
    version = dataset_version or logged_dataset_version(name, str(candidate.version))
    if not version:
        raise PromotionError(
            f"{name} version {candidate.version} records no dataset version; pass one explicitly"
        )
    split = scoring.Split.of(store or open_store(settings=settings), version, settings)
    scores = scoring.challenger_scores(settings, client, split, candidate)
    champion = get_alias_version(client, name, CHAMPION)
    same = champion is not None and str(champion.version) == str(candidate.version)
    rival = None
    if champion is not None and not same:
        rival = scoring.champion_scores(settings, client, split, champion)
    before = None if champion is None else str(champion.version)
    result = _judge(scores, rival, before, settings, floor=floor, tolerance=tolerance, same=same)
    return record(settings, client, result)


def _judge(
    scores: scoring.Scores,
    rival: scoring.ChampionScores | None,
    champion_version: str | None,
    settings: Settings,
    *,
    floor: float | None,
    tolerance: float | None,
    same: bool,
) -> PromotionResult:
    """The gate on the scores (no I/O): the served precision, the decision, and the reports
    behind them, as an unrecorded :class:`PromotionResult` (``same``: the candidate is the
    champion already, its own report is the champion's)."""
    choice = scores.serving(settings.promotion)
    served = scores.report(choice.precision)
    champion = served if same else (rival.report if rival is not None else None)
    decision = gate.judge(
        served,
        champion,
        settings,
        floor=settings.promotion.promotion_floor if floor is None else floor,
        tolerance=settings.promotion.promotion_tolerance if tolerance is None else tolerance,
        note=rival.note if rival is not None else "",
    )
    return PromotionResult(
        name=settings.tracking.model_name,
        challenger_version=scores.version,
        champion_version_before=champion_version,
        champion_version_after=champion_version,
        dataset_version=scores.dataset_version,
        decision=decision,
        challenger_report=served,
        champion_report=None if rival is None else rival.report,
        benchmark_version=scores.benchmark_version,
        challenger_benchmark=scores.benchmark_report(choice.precision),
        champion_benchmark=None if rival is None else rival.benchmark,
        serving=choice,
    )


def record(settings: Settings, client: Any, result: PromotionResult) -> PromotionResult:
    """Record a judged result: the MLflow run, the model version's ``promotion.*`` and
    ``serving.*`` tags, and, when it passes, the ``champion`` alias (the only code that
    moves it). Returns ``result`` with its run id and the champion after."""
    result.run_id = _log_run(settings, result)
    tags = {TAG_PREFIX + k: v for k, v in _promotion_tags(settings, result).items()}
    if result.serving is not None:
        tags |= result.serving.tags()
    for key, value in tags.items():
        client.set_model_version_tag(result.name, result.challenger_version, key, value)
    if result.promoted:
        client.set_registered_model_alias(result.name, CHAMPION, result.challenger_version)
        result.champion_version_after = result.challenger_version
    return result


def _decision_word(result: PromotionResult) -> str:
    return "promoted" if result.promoted else "rejected"


def _log_run(settings: Settings, result: PromotionResult) -> str:
    """The promotion's MLflow run: its decision, the gate's settings and every figure."""
    d = result.decision
    use_experiment(settings)
    with mlflow.start_run(run_name=f"promote-v{result.challenger_version}") as run:
        mlflow.set_tags(
            {
                "model_name": result.name,
                "model_version": result.challenger_version,
                "champion_version": result.champion_version_before or "none",
                "dataset_version": result.dataset_version,
                "decision": _decision_word(result),
            }
        )
        params = {"floor": d.floor, "tolerance": d.tolerance}
        mlflow.log_params(params | {"dataset_version": result.dataset_version})
        if result.serving is not None:
            mlflow.set_tags(result.serving.tags())
            mlflow.log_params(_int8_params(settings))
            mlflow.log_metrics(result.serving.agreement_figures())
        if result.challenger_report is not None:
            log_report(result.challenger_report, prefix="test_")
        _log_metrics(result.champion_report, "champion_test_")
        mlflow.set_tag("benchmark_dataset_version", result.benchmark_version or "none")
        _log_metrics(result.challenger_benchmark, "benchmark_test_")
        _log_metrics(result.champion_benchmark, "champion_benchmark_test_")
        return str(run.info.run_id)


def _int8_params(settings: Settings) -> dict[str, float]:
    """The settings that chose the served precision."""
    p = settings.promotion
    return {
        "int8_tolerance": p.int8_tolerance,
        "int8_min_agreement": p.int8_min_agreement,
        "int8_max_probability_diff": p.int8_max_probability_diff,
        "int8_agreement_photos": p.int8_agreement_photos,
    }


def _log_metrics(report: EvaluationReport | None, prefix: str) -> None:
    if report is not None:
        mlflow.log_metrics(report.scalar_metrics(prefix))


def _promotion_tags(settings: Settings, result: PromotionResult) -> dict[str, str]:
    """The ``promotion.*`` tags (without the prefix) of a judged and logged result."""
    d = result.decision
    report = result.challenger_report
    return {
        "decision": _decision_word(result),
        "reason": d.reason,
        "challenger_accuracy": f"{d.challenger_accuracy:.6f}",
        "champion_accuracy": tag_value(d.champion_accuracy),
        "champion_version": result.champion_version_before or "none",
        "floor": str(d.floor),
        "tolerance": str(d.tolerance),
        "dataset_version": result.dataset_version,
        "test_images": str(report.metrics["n"]) if report is not None else "0",
        "challenger_ood_unknown_share": tag_value(d.challenger_ood_unknown),
        "champion_ood_unknown_share": tag_value(d.champion_ood_unknown),
        "ood_tolerance": str(settings.promotion.promotion_ood_tolerance),
        "challenger_right_answers": tag_value(d.challenger_right_answers),
        "champion_right_answers": tag_value(d.champion_right_answers),
        "max_source_unknown": str(settings.promotion.promotion_max_source_unknown),
        "source_unknown_shares": ", ".join(
            f"{k} {v:.4f}" for k, v in sorted(d.source_unknown.items())
        )
        or "none",
        "benchmark_dataset_version": result.benchmark_version or "none",
        "challenger_benchmark_accuracy": _accuracy_tag(result.challenger_benchmark),
        "champion_benchmark_accuracy": _accuracy_tag(result.champion_benchmark),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": str(result.run_id),
    }


def _accuracy_tag(report: EvaluationReport | None) -> str:
    return tag_value(report.accuracy if report is not None else None)
