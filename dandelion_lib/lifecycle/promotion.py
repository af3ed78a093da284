"""Promotion: the gate rule and the one place that moves the ``champion`` alias.

The ``challenger`` and the current ``champion`` are re-scored on the same test split (and,
for figures comparable over time, on the frozen benchmark: the store's first version's test
split, logged beside it), each as it will be served: the challenger in FP32 ONNX and, when
it has one, its INT8 artifact, :func:`serving_choice` picking the precision (INT8 only when
its figures are within ``int8_tolerance`` of FP32's) and the gate judging that one;
:func:`promotion_gate` decides (accuracy floor, tolerance versus the champion, and no
regression in how many of the split's out-of-domain photos are answered ``unknown``); the decision
and its numbers become ``promotion.*`` tags on the challenger's model version, and only the
``champion`` alias moves. Notebook 03, the DAG's ``promote`` step and ``dandelion promote``
all call :func:`promote`; training only registers a ``challenger``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow

from dandelion_lib.core.config import Settings, get_settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.storage import open_store
from dandelion_lib.data.dataset import DatasetError, benchmark_version, load_manifest
from dandelion_lib.lifecycle import evaluate
from dandelion_lib.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    configure_mlflow,
    get_alias_version,
    use_experiment,
)
from dandelion_lib.serving.predict import SERVING_TAG, ModelUnavailableError, Predictor

TAG_PREFIX = "promotion."

log = logging.getLogger(__name__)


class PromotionError(DandelionError):
    """Promotion cannot be decided (no challenger, no dataset version...)."""


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict and the numbers behind it."""

    promote: bool
    reason: str
    challenger_accuracy: float
    champion_accuracy: float | None
    floor: float
    tolerance: float
    challenger_ood_unknown: float | None = None
    """Share of the split's out-of-domain photos the challenger answers ``unknown``."""
    champion_ood_unknown: float | None = None
    ood_tolerance: float | None = None


def promotion_gate(
    challenger_accuracy: float,
    champion_accuracy: float | None,
    *,
    floor: float,
    tolerance: float,
    challenger_ood_unknown: float | None = None,
    champion_ood_unknown: float | None = None,
    ood_tolerance: float = 0.05,
) -> GateDecision:
    """Promote when accuracy >= ``floor`` and not worse than the champion by more than
    ``tolerance`` (both measured on the same test split), and when the share of the split's
    out-of-domain photos answered ``unknown`` has not dropped below the champion's by more
    than ``ood_tolerance`` (a challenger without a detector answers none of them)."""
    ood_measured = champion_ood_unknown is not None

    def decide(ok: bool, reason: str) -> GateDecision:
        return GateDecision(
            ok,
            reason,
            challenger_accuracy,
            champion_accuracy,
            floor,
            tolerance,
            challenger_ood_unknown,
            champion_ood_unknown,
            ood_tolerance if ood_measured or challenger_ood_unknown is not None else None,
        )

    eps = 1e-9  # accuracies are ratios of counts: exact ties must not fail on rounding
    if not challenger_accuracy >= floor - eps:  # also rejects NaN
        return decide(False, f"accuracy {challenger_accuracy:.4f} is below the floor {floor:.4f}")
    if champion_accuracy is None:
        return decide(True, f"accuracy {challenger_accuracy:.4f} >= floor {floor:.4f}; no champion")
    if challenger_accuracy < champion_accuracy - tolerance - eps:
        return decide(
            False,
            f"accuracy {challenger_accuracy:.4f} is worse than the champion's "
            f"{champion_accuracy:.4f} by more than {tolerance:.4f}",
        )
    ood_note = ""
    if champion_ood_unknown is not None:
        challenger_ood = challenger_ood_unknown if challenger_ood_unknown is not None else 0.0
        if not challenger_ood >= champion_ood_unknown - ood_tolerance - eps:
            return decide(
                False,
                f"out-of-domain photos answered 'unknown' {challenger_ood:.4f} is below the "
                f"champion's {champion_ood_unknown:.4f} by more than {ood_tolerance:.4f}",
            )
        ood_note = (
            f"; out-of-domain rejection {challenger_ood:.4f} within {ood_tolerance:.4f} "
            f"of (or above) the champion's {champion_ood_unknown:.4f}"
        )
    return decide(
        True,
        f"accuracy {challenger_accuracy:.4f} >= floor {floor:.4f} and within {tolerance:.4f} "
        f"of (or above) the champion's {champion_accuracy:.4f}{ood_note}",
    )


SERVING_FIGURES = ("accuracy", "roc_auc", "ood_unknown_share")
"""Test figures INT8 must keep within the tolerance of FP32 to be served."""


@dataclass(frozen=True)
class ServingChoice:
    """The runtime and precision a version is served with, and the figures behind it."""

    runtime: str
    precision: str
    reason: str
    tolerance: float
    fp32: dict[str, float | None] = field(default_factory=dict)
    int8: dict[str, float | None] | None = None

    def tags(self) -> dict[str, str]:
        """The version's ``serving.*`` tags (the Predictor serves ``serving.precision``)."""
        tags = {
            "runtime": self.runtime,
            "precision": self.precision,
            "reason": self.reason,
            "int8_tolerance": str(self.tolerance),
        }
        for precision, figures in (("fp32", self.fp32), ("int8", self.int8 or {})):
            for name in SERVING_FIGURES:
                if precision == "fp32" or self.int8 is not None:
                    tags[f"{precision}_{name}"] = _tag_value(figures.get(name))
        return {SERVING_TAG + k: v for k, v in tags.items()}


def _figures(report: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in SERVING_FIGURES:
        value = report.metrics.get(name)
        ok = isinstance(value, int | float) and not math.isnan(float(value))
        out[name] = float(value) if ok else None
    return out


def serving_choice(fp32: Any, int8: Any | None, tolerance: float) -> ServingChoice:
    """The served precision: INT8 when each of its test figures (accuracy, ROC AUC and,
    for a model with an open-set detector, the out-of-domain 'unknown' share) is within
    ``tolerance`` of FP32's (either direction: a model that answers differently is not the
    model that was gated), otherwise FP32. ``int8`` None: the version has no INT8 artifact."""
    base = _figures(fp32)
    if int8 is None:
        return ServingChoice("onnx", "fp32", "no INT8 artifact", tolerance, base)
    quant = _figures(int8)
    diffs = {
        name: abs(a - b)
        for name in SERVING_FIGURES
        if (a := base[name]) is not None and (b := quant[name]) is not None
    }
    missing = [n for n in SERVING_FIGURES if (base[n] is None) != (quant[n] is None)]
    worst = max(diffs, key=lambda n: diffs[n]) if diffs else None
    if missing:
        reason = f"INT8 lacks {', '.join(missing)} that FP32 has"
        return ServingChoice("onnx", "fp32", reason, tolerance, base, quant)
    if worst is not None and not diffs[worst] <= tolerance + 1e-9:
        reason = (
            f"INT8 test {worst} {quant[worst]:.4f} differs from FP32's {base[worst]:.4f} "
            f"by more than {tolerance:g}"
        )
        return ServingChoice("onnx", "fp32", reason, tolerance, base, quant)
    largest = "" if worst is None else f" (largest difference: {worst} {diffs[worst]:.4f})"
    reason = f"INT8 test figures within {tolerance:g} of FP32's{largest}"
    return ServingChoice("onnx", "int8", reason, tolerance, base, quant)


def _served(
    fp32: Predictor, uri: str, store: Any, version: str, manifest: Any, settings: Settings
) -> tuple[Predictor, Any, ServingChoice]:
    """The candidate as it will be served, its report on the test split and the choice.

    ``fp32`` (the candidate loaded in FP32) is scored, then INT8 when the version has it; :func:`serving_choice` picks.
    A version without a usable ONNX artifact (or ``serving_runtime=keras``) is scored and
    served as Keras."""
    tolerance = settings.int8_tolerance
    report = evaluate.evaluate_split(fp32, store, version, manifest=manifest)
    if fp32.runtime != "onnx":
        why = fp32.runtime_note or f"serving_runtime is {settings.serving_runtime}"
        return fp32, report, ServingChoice("keras", "fp32", why, tolerance, _figures(report))
    try:
        int8: Predictor | None = Predictor.load(uri, precision="int8", runtime="onnx")
    except ModelUnavailableError as exc:
        log.info("no INT8 candidate: %s", exc)
        int8 = None
    if int8 is None:
        return fp32, report, serving_choice(report, None, tolerance)
    int8_report = evaluate.evaluate_split(int8, store, version, manifest=manifest)
    choice = serving_choice(report, int8_report, tolerance)
    if choice.precision == "int8":
        return int8, int8_report, choice
    return fp32, report, choice


@dataclass
class PromotionResult:
    name: str
    challenger_version: str
    champion_version_before: str | None
    champion_version_after: str | None
    dataset_version: str
    decision: GateDecision
    run_id: str | None = None
    challenger_report: Any = field(default=None, repr=False)
    champion_report: Any = field(default=None, repr=False)
    benchmark_version: str | None = None
    """The dataset version whose test split is the frozen benchmark (logged, not gated)."""
    challenger_benchmark: Any = field(default=None, repr=False)
    champion_benchmark: Any = field(default=None, repr=False)
    serving: ServingChoice | None = None
    """The runtime and precision the challenger was judged (and will be served) with."""

    @property
    def promoted(self) -> bool:
        return self.decision.promote

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        champ = self.champion_version_after or "none"
        return (
            f"{verdict}: {self.name} version {self.challenger_version} on dataset "
            f"{self.dataset_version}: {self.decision.reason}. Champion is now version {champ}."
            + (
                f" Judged as served: {self.serving.runtime} {self.serving.precision} "
                f"({self.serving.reason})."
                if self.serving is not None
                else ""
            )
        )


def promote(
    settings: Settings | None = None,
    *,
    candidate_alias: str = CHALLENGER,
    dataset_version: str | None = None,
    store: Any = None,
    floor: float | None = None,
    tolerance: float | None = None,
) -> PromotionResult:
    """Re-score the candidate and the current champion on the same test split, apply the
    gate, record the decision as model-version tags and, if it passes, move ``champion``.

    The test split is the one of ``dataset_version`` (default: the candidate's own
    training dataset version). A champion that cannot be loaded or scored any more is
    recorded as such and the gate then applies the floor only.
    """
    settings = settings or get_settings()
    client = configure_mlflow(settings)
    name = settings.model_name
    floor = settings.promotion_floor if floor is None else floor
    tolerance = settings.promotion_tolerance if tolerance is None else tolerance
    candidate = get_alias_version(client, name, candidate_alias)
    if candidate is None:
        raise PromotionError(
            f"no version of model {name!r} has the alias {candidate_alias!r}; train one first"
        )
    champion = get_alias_version(client, name, CHAMPION)
    uri = f"models:/{name}/{candidate.version}"
    fp32 = Predictor.load(uri, precision="fp32")
    version = dataset_version or fp32.dataset_version
    if not version:
        raise PromotionError(
            f"{name} version {candidate.version} records no dataset version; pass one explicitly"
        )
    store = store or open_store(settings=settings)
    manifest = load_manifest(store, version)
    # The gate judges the model as it will be served: runtime and precision included.
    challenger, report, choice = _served(fp32, uri, store, version, manifest, settings)

    champion_acc: float | None = None
    champion_report = None
    champion_note = ""
    current: Predictor | None = None
    if champion is not None and str(champion.version) == str(candidate.version):
        champion_acc = report.accuracy
    elif champion is not None:
        current, champion_report, champion_note = _rescore(
            f"models:/{name}/{champion.version}", store, version, manifest
        )
        champion_acc = champion_report.accuracy if champion_report is not None else None
    # (when the candidate is the champion already, its own report is the champion's)
    champion_ood = _ood_unknown_share(
        champion_report if champion_report is not None or champion_acc is None else report
    )
    decision = promotion_gate(
        report.accuracy,
        champion_acc,
        floor=floor,
        tolerance=tolerance,
        challenger_ood_unknown=_ood_unknown_share(report),
        champion_ood_unknown=champion_ood,
        ood_tolerance=settings.promotion_ood_tolerance,
    )
    if champion_note:
        decision = GateDecision(**{**decision.__dict__, "reason": decision.reason + champion_note})
    # The frozen benchmark: figures comparable over time, whatever the new version adds.
    bench = benchmark_version(store, settings.benchmark_dataset_version)
    bench_challenger = _on_benchmark(challenger, store, bench, version, report)
    bench_champion = (
        _on_benchmark(current, store, bench, version, champion_report)
        if current is not None
        else None
    )

    use_experiment(settings)
    with mlflow.start_run(run_name=f"promote-v{candidate.version}") as run:
        mlflow.set_tags(
            {
                "model_name": name,
                "model_version": candidate.version,
                "champion_version": champion.version if champion else "none",
                "dataset_version": version,
                "decision": "promoted" if decision.promote else "rejected",
            }
        )
        mlflow.log_params({"floor": floor, "tolerance": tolerance, "dataset_version": version})
        mlflow.set_tags(choice.tags())
        evaluate.log_report(report, prefix="test_")
        if champion_report is not None:
            mlflow.log_metrics(champion_report.scalar_metrics("champion_test_"))
        mlflow.set_tag("benchmark_dataset_version", bench or "none")
        if bench_challenger is not None:
            mlflow.log_metrics(bench_challenger.scalar_metrics("benchmark_test_"))
        if bench_champion is not None:
            mlflow.log_metrics(bench_champion.scalar_metrics("champion_benchmark_test_"))
        run_id = run.info.run_id

    tags = {
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "challenger_accuracy": f"{decision.challenger_accuracy:.6f}",
        "champion_accuracy": "none"
        if decision.champion_accuracy is None
        else f"{decision.champion_accuracy:.6f}",
        "champion_version": champion.version if champion else "none",
        "floor": str(floor),
        "tolerance": str(tolerance),
        "dataset_version": version,
        "test_images": str(report.metrics["n"]),
        "challenger_ood_unknown_share": _tag_value(decision.challenger_ood_unknown),
        "champion_ood_unknown_share": _tag_value(decision.champion_ood_unknown),
        "ood_tolerance": str(settings.promotion_ood_tolerance),
        "benchmark_dataset_version": bench or "none",
        "challenger_benchmark_accuracy": _accuracy_tag(bench_challenger),
        "champion_benchmark_accuracy": _accuracy_tag(bench_champion),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, candidate.version, TAG_PREFIX + key, value)
    for key, value in choice.tags().items():
        client.set_model_version_tag(name, candidate.version, key, value)
    after = champion.version if champion else None
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
        after = str(candidate.version)
    return PromotionResult(
        name=name,
        challenger_version=str(candidate.version),
        champion_version_before=champion.version if champion else None,
        champion_version_after=after,
        dataset_version=version,
        decision=decision,
        run_id=run_id,
        challenger_report=report,
        champion_report=champion_report,
        benchmark_version=bench,
        challenger_benchmark=bench_challenger,
        champion_benchmark=bench_champion,
        serving=choice,
    )


def _rescore(uri: str, store: Any, version: str, manifest: Any) -> tuple[Any, Any, str]:
    """The champion, its report on the test split, or why it could not be re-scored."""
    try:
        current = Predictor.load(uri)
        return current, evaluate.evaluate_split(current, store, version, manifest=manifest), ""
    except (ModelUnavailableError, evaluate.EvaluationError) as exc:
        return None, None, f" (champion {uri} could not be re-scored: {exc})"


def _on_benchmark(
    predictor: Predictor, store: Any, bench: str | None, version: str, same: Any
) -> Any:
    """``predictor``'s report on the benchmark's test split (``same`` when the benchmark is
    the version just scored; ``None`` when there is none or it cannot be read)."""
    if bench is None:
        return None
    if bench == version:
        return same
    try:
        return evaluate.evaluate_split(predictor, store, bench)
    except (evaluate.EvaluationError, DatasetError) as exc:
        log.warning("benchmark dataset %s not scored: %s", bench, exc)
        return None


def _ood_unknown_share(report: Any) -> float | None:
    """The share of the split's out-of-domain photos answered ``unknown`` (None when the
    split has none, the model has no detector, or there is no report)."""
    if report is None:
        return None
    value = report.metrics.get("ood_unknown_share")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _accuracy_tag(report: Any) -> str:
    return _tag_value(report.accuracy if report is not None else None)


def _tag_value(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion promote``."""
    parser.add_argument("--alias", default=CHALLENGER, help="alias of the candidate version")
    parser.add_argument(
        "--dataset-version", help="test split to score on (default: the candidate's dataset)"
    )
    parser.add_argument("--floor", type=float, help="minimum accuracy (DANDELION_PROMOTION_FLOOR)")
    parser.add_argument(
        "--tolerance", type=float, help="allowed drop vs champion (DANDELION_PROMOTION_TOLERANCE)"
    )


def cli(args: argparse.Namespace) -> int:
    result = promote(
        candidate_alias=args.alias,
        dataset_version=args.dataset_version,
        floor=args.floor,
        tolerance=args.tolerance,
    )
    print(result.summary())
    return 0
