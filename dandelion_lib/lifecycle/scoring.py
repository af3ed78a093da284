"""Scoring: a model version's reports on a test split, as it can be served, computed once and
saved with its MLflow run (``scores.json``, :mod:`dandelion_lib.lifecycle.scorecard`).

The challenger is scored on the test split in FP32 (ONNX Runtime, or Keras for a version
without a usable ONNX artifact or with ``serving_runtime=keras``) and, when it has one, in
INT8, whose answers are also compared with FP32's on the dataset version's photos
(:mod:`dandelion_lib.lifecycle.agreement`, up to ``int8_agreement_photos``); on the benchmark
split (the frozen benchmark version's test split, logged for figures
comparable over time) in the precision the gate would serve. Training scores the version it
registers with the runtime it has just built and saves the result (:mod:`.train`); the DAG's
``evaluate`` step (notebook 03), the ``promote`` step and the run summary read it, and score
only a version that has no scores for the split (a version trained before, or another test
split). The champion is read from its own saved scores when they are for the same test split
and benchmark; otherwise it is scored on the challenger's test split, as it is served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from dandelion_lib.core.config import PromotionSettings, Settings
from dandelion_lib.data.dataset import DatasetError, benchmark_version, load_manifest
from dandelion_lib.lifecycle import evaluate, gate, scorecard
from dandelion_lib.lifecycle.agreement import (
    Agreement,
    Answered,
    answered_in_reports,
    measure_agreement,
)
from dandelion_lib.lifecycle.metrics import EvaluationError, EvaluationReport
from dandelion_lib.serving.loading import ModelUnavailableError
from dandelion_lib.serving.predict import SERVING_TAG, Predictor

log = logging.getLogger(__name__)


@dataclass
class Split:
    """The test split scores are for (a dataset version's) and the benchmark beside it."""

    store: Any
    version: str
    benchmark: str | None
    _manifest: Any = field(default=None, repr=False)

    @classmethod
    def of(cls, store: Any, version: str, settings: Settings) -> Split:
        """``version``'s test split, with the store's (or the pinned) benchmark version."""
        return cls(
            store, version, benchmark_version(store, settings.promotion.benchmark_dataset_version)
        )

    def manifest(self) -> Any:
        """The dataset version's manifest (read once)."""
        if self._manifest is None:
            self._manifest = load_manifest(self.store, self.version)
        return self._manifest

    def score(self, predictor: Predictor) -> EvaluationReport:
        """``predictor``'s report on the test split."""
        return evaluate.evaluate_split(
            predictor, self.store, self.version, manifest=self.manifest()
        )

    def agreement(
        self, fp32: Predictor, int8: Predictor, limit: int, answered: Answered | None = None
    ) -> Agreement:
        """INT8 versus FP32 on the dataset version's photos (at most ``limit``; those in
        ``answered`` are not run again)."""
        return measure_agreement(
            fp32, int8, self.store, self.manifest(), limit=limit, answered=answered
        )

    def score_benchmark(self, predictor: Predictor) -> EvaluationReport | None:
        """``predictor``'s report on the benchmark split when it is another dataset version
        (None when there is none or it cannot be read)."""
        if self.benchmark is None or self.benchmark == self.version:
            return None
        try:
            return evaluate.evaluate_split(predictor, self.store, self.benchmark)
        except (EvaluationError, DatasetError) as exc:
            log.warning("benchmark dataset %s not scored: %s", self.benchmark, exc)
            return None


@dataclass(frozen=True)
class Scores:
    """A model version's reports on one test split, FP32 and INT8, and on the benchmark."""

    version: str
    dataset_version: str
    serving_runtime: str
    """The ``serving_runtime`` setting the version was scored under."""
    runtime: str
    """What scored FP32: ``onnx`` or ``keras``."""
    runtime_note: str | None
    fp32: EvaluationReport
    int8: EvaluationReport | None
    benchmark_version: str | None
    benchmark: EvaluationReport | None = None
    """The report on the benchmark split when it is another dataset version."""
    benchmark_precision: str | None = None
    agreement: Agreement | None = None
    """INT8 versus FP32 on the dataset version's photos (None: no INT8, or scores saved
    before agreement was measured)."""

    def named(self, version: str, uri: str) -> Scores:
        """These scores as model version ``version`` (``uri``)'s: training scores a version
        before the registry numbers it."""

        def named(report: EvaluationReport | None) -> EvaluationReport | None:
            return None if report is None else replace(report, model_uri=uri, model_version=version)

        return replace(
            self,
            version=version,
            fp32=replace(self.fp32, model_uri=uri, model_version=version),
            int8=named(self.int8),
            benchmark=named(self.benchmark),
        )

    def report(self, precision: str) -> EvaluationReport:
        """The test-split report in ``precision`` (FP32 when there is no INT8 report)."""
        return self.int8 if precision == "int8" and self.int8 is not None else self.fp32

    def benchmark_report(self, precision: str) -> EvaluationReport | None:
        """The benchmark report in ``precision`` (None when not scored in it)."""
        if self.benchmark_version == self.dataset_version:
            return self.report(precision)
        return self.benchmark if self.benchmark_precision == precision else None

    def serving(self, promotion: PromotionSettings) -> gate.ServingChoice:
        """The gate's runtime and precision for these scores (:func:`gate.serving_of`)."""
        keras = None
        if self.runtime != "onnx":
            keras = self.runtime_note or f"serving_runtime is {self.serving_runtime}"
        return gate.serving_of(
            self.fp32, self.int8, keras_reason=keras, promotion=promotion, agreement=self.agreement
        )

    def holds(self, split: Split, serving_runtime: str, precision: str) -> bool:
        """Whether these scores answer for ``split`` (and its benchmark) as served in
        ``precision`` under the ``serving_runtime`` setting."""
        same = (self.dataset_version, self.benchmark_version, self.serving_runtime) == (
            split.version,
            split.benchmark,
            serving_runtime,
        )
        if not same or split.benchmark is None:
            return same
        return self.benchmark_report(precision) is not None

    def to_record(self) -> dict[str, Any]:
        """The JSON record :mod:`dandelion_lib.lifecycle.scorecard` saves."""
        return {
            "version": self.version,
            "dataset_version": self.dataset_version,
            "serving_runtime": self.serving_runtime,
            "runtime": self.runtime,
            "runtime_note": self.runtime_note,
            "reports": {
                "fp32": self.fp32.to_dict(),
                "int8": None if self.int8 is None else self.int8.to_dict(),
            },
            "benchmark_version": self.benchmark_version,
            "benchmark": None if self.benchmark is None else self.benchmark.to_dict(),
            "benchmark_precision": self.benchmark_precision,
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
            "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Scores:
        """The scores :meth:`to_record` wrote."""
        reports = record["reports"]
        agreement = record.get("agreement")

        def report(data: dict[str, Any] | None) -> EvaluationReport | None:
            return None if data is None else EvaluationReport.from_dict(data)

        return cls(
            version=str(record["version"]),
            dataset_version=record["dataset_version"],
            serving_runtime=record["serving_runtime"],
            runtime=record["runtime"],
            runtime_note=record.get("runtime_note"),
            fp32=EvaluationReport.from_dict(reports["fp32"]),
            int8=report(reports.get("int8")),
            benchmark_version=record.get("benchmark_version"),
            benchmark=report(record.get("benchmark")),
            benchmark_precision=record.get("benchmark_precision"),
            agreement=None if agreement is None else Agreement.from_dict(agreement),
        )


@dataclass(frozen=True)
class ChampionScores:
    """The champion as served, on the challenger's test split and on the benchmark."""

    version: str
    report: EvaluationReport | None
    """None: the champion could not be scored (``note`` says why)."""
    benchmark: EvaluationReport | None = None
    note: str = ""


def saved_scores(client: Any, mv: Any) -> Scores | None:
    """The scores saved with a model version's run (None when there are none, or they are
    another version's of the same run)."""
    record = scorecard.load(client, mv.run_id) if mv.run_id else None
    if record is None or str(record.get("version")) != str(mv.version):
        return None
    try:
        return Scores.from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("scores of version %s cannot be read: %s", mv.version, exc)
        return None


def score_version(settings: Settings, uri: str, split: Split) -> Scores:
    """Score a model version on ``split``: FP32 (ONNX, else Keras) and, when the version has
    it, INT8 on the test split, with INT8's agreement with FP32 on the dataset version's
    photos; the benchmark in the precision the gate would serve."""
    fp32 = Predictor.load(uri, settings, precision="fp32")
    int8 = _load_int8(uri, settings) if fp32.runtime == "onnx" else None
    return score_predictors(settings, fp32, int8, split, str(fp32.version))


def score_predictors(
    settings: Settings,
    fp32: Predictor,
    int8: Predictor | None,
    split: Split,
    version: str,
    *,
    benchmark: bool = True,
) -> Scores:
    """:func:`score_version` with the runtimes loaded: training scores the version it is
    about to register with the runtime it has just built (:mod:`.train`), once. Without
    ``benchmark`` the benchmark split is not scored (a model nothing will promote)."""
    limit = settings.promotion.int8_agreement_photos
    fp32_report = split.score(fp32)
    int8_report, agreement = None, None
    if int8 is not None:
        int8_report = split.score(int8)
        # The test split's photos were just run in both precisions: compared, not run again.
        answered = answered_in_reports(fp32_report, int8_report, fp32.policy.unknown)
        agreement = split.agreement(fp32, int8, limit, answered)
    scores = Scores(
        version=version,
        dataset_version=split.version,
        serving_runtime=settings.serving.serving_runtime,
        runtime=fp32.runtime,
        runtime_note=fp32.runtime_note,
        fp32=fp32_report,
        int8=int8_report,
        benchmark_version=split.benchmark,
        agreement=agreement,
    )
    if not benchmark:
        return scores
    precision = scores.serving(settings.promotion).precision
    served = int8 if precision == "int8" and int8 is not None else fp32
    report = split.score_benchmark(served)
    if report is None:
        return scores
    return replace(scores, benchmark=report, benchmark_precision=precision)


def _load_int8(uri: str, settings: Settings) -> Predictor | None:
    try:
        return Predictor.load(uri, settings, precision="int8", runtime="onnx")
    except ModelUnavailableError as exc:
        log.info("no INT8 candidate: %s", exc)
        return None


def challenger_scores(settings: Settings, client: Any, split: Split, mv: Any) -> Scores:
    """The candidate version's scores on ``split``: those saved with its run when they are
    for this test split, benchmark and ``serving_runtime``; otherwise scored now
    (:func:`score_version`) and saved."""
    saved = saved_scores(client, mv)
    if saved is not None:
        precision = saved.serving(settings.promotion).precision
        if saved.holds(split, settings.serving.serving_runtime, precision):
            return saved
    scores = score_version(settings, f"models:/{mv.name}/{mv.version}", split)
    if mv.run_id:
        scorecard.save(client, mv.run_id, scores.to_record())
    return scores


def champion_scores(settings: Settings, client: Any, split: Split, mv: Any) -> ChampionScores:
    """The champion version as served (its ``serving.precision``): from its saved scores when
    they are for the challenger's test split and benchmark; otherwise it is scored now on the
    challenger's test split (and the benchmark), not saved. A champion that cannot be loaded
    or scored has no report and a note that says why."""
    precision = (mv.tags or {}).get(SERVING_TAG + "precision") or "fp32"
    saved = saved_scores(client, mv)
    if saved is not None and saved.holds(split, settings.serving.serving_runtime, precision):
        report = saved.report(precision)
        return ChampionScores(str(mv.version), report, saved.benchmark_report(precision))
    uri = f"models:/{mv.name}/{mv.version}"
    try:
        current = Predictor.load(uri, settings)
        report = split.score(current)
    except (ModelUnavailableError, EvaluationError) as exc:
        return ChampionScores(
            str(mv.version), None, note=f" (champion {uri} could not be re-scored: {exc})"
        )
    benchmark = report if split.benchmark == split.version else split.score_benchmark(current)
    return ChampionScores(str(mv.version), report, benchmark)
