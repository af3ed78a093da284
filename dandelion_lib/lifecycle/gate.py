"""The promotion gate: pure functions of the scores and the settings (no I/O).

* :func:`serving_choice` / :func:`serving_of`: the runtime and precision a version is served
  with (INT8 only when it answers the dataset version's photos as FP32 does,
  :mod:`dandelion_lib.lifecycle.agreement`, and its test figures do not drop beyond what
  one photo moves);
* :func:`promotion_gate`: promote or not (accuracy floor, tolerance versus the champion, no
  regression in how many of the split's out-of-domain photos are answered ``unknown``) and
  :func:`user_verdict`, what users get: no labelled source's test photos refused (answered
  ``unknown``) above ``promotion_max_source_unknown``, and right answers not below the
  champion's by more than ``promotion_right_answers_tolerance``;
* :func:`judge`: :func:`promotion_gate` applied to the reports of the served challenger and of
  the champion on the same test split.

The scores come from :mod:`dandelion_lib.lifecycle.scoring`; recording the decision and moving
``champion`` is :mod:`dandelion_lib.lifecycle.promotion`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from dandelion_lib.core.config import PromotionSettings, Settings
from dandelion_lib.lifecycle.agreement import Agreement
from dandelion_lib.lifecycle.metrics import EvaluationReport
from dandelion_lib.serving.predict import SERVING_TAG

EPS = 1e-9
"""Accuracies are ratios of counts: exact ties must not fail on rounding."""

SERVING_FIGURES = ("accuracy", "roc_auc", "ood_unknown_share")
"""Test figures INT8 must keep within the tolerance of FP32 to be served."""

SLACK_PHOTOS = 1.5
"""With an agreement, an INT8 test figure over ``n`` photos may differ from FP32's by
``SLACK_PHOTOS / n``: one photo answered differently passes, two do not."""


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
    challenger_right_answers: float | None = None
    """Share of the test photos whose answer is their true label."""
    champion_right_answers: float | None = None
    source_unknown: dict[str, float] = field(default_factory=dict)
    """Per labelled source, the share of its test photos the challenger answers ``unknown``."""


MIN_REFUSED = 2
"""A source's refusals fail the gate only from this many photos on: on a test part of 30
photos, one photo alone is above 3 % and says little."""


def user_verdict(
    source_unknown: dict[str, tuple[float, int]],
    max_share: float,
    right_answers: tuple[float | None, float | None],
    tolerance: float,
) -> tuple[bool, str]:
    """What users get: (passes, rejection reason or the note a pass adds).

    ``source_unknown``: per labelled source, (share of its test photos answered ``unknown``,
    how many photos that is); ``right_answers``: (challenger's, champion's or None)."""
    worst = sorted(source_unknown.items(), key=lambda kv: (-kv[1][0], kv[0]))
    for origin, (share, refused) in worst:
        if share > max_share + EPS and refused >= MIN_REFUSED:
            return False, (
                f"source {origin!r}: {share:.4f} of its test photos answered 'unknown' "
                f"({refused} photos), above {max_share:.4f}"
            )
    challenger, champion = right_answers
    note = ""
    if challenger is not None and champion is not None:
        if challenger < champion - tolerance - EPS:
            return False, (
                f"right answers {challenger:.4f} are below the champion's {champion:.4f} "
                f"by more than {tolerance:.4f}"
            )
        note = f"; right answers {challenger:.4f} (champion {champion:.4f})"
    elif challenger is not None:
        note = f"; right answers {challenger:.4f}"
    if worst:
        origin, (share, _) = worst[0]
        note += f"; most refused source {origin!r} {share:.4f}"
    return True, note


def _accuracy_verdict(
    challenger: float, champion: float | None, floor: float, tolerance: float
) -> tuple[bool, str] | None:
    """A verdict on accuracy alone (None: accuracy passes against a champion)."""
    if not challenger >= floor - EPS:  # also rejects NaN
        return False, f"accuracy {challenger:.4f} is below the floor {floor:.4f}"
    if champion is None:
        return True, f"accuracy {challenger:.4f} >= floor {floor:.4f}; no champion"
    if challenger < champion - tolerance - EPS:
        return False, (
            f"accuracy {challenger:.4f} is worse than the champion's "
            f"{champion:.4f} by more than {tolerance:.4f}"
        )
    return None


def _ood_verdict(
    challenger: float | None, champion: float | None, tolerance: float
) -> tuple[bool, str]:
    """The out-of-domain rule: (passes, rejection reason or the note a pass adds)."""
    if champion is None:
        return True, ""
    share = challenger if challenger is not None else 0.0
    if not share >= champion - tolerance - EPS:
        return False, (
            f"out-of-domain photos answered 'unknown' {share:.4f} is below the "
            f"champion's {champion:.4f} by more than {tolerance:.4f}"
        )
    return True, (
        f"; out-of-domain rejection {share:.4f} within {tolerance:.4f} "
        f"of (or above) the champion's {champion:.4f}"
    )


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
    measured = champion_ood_unknown is not None or challenger_ood_unknown is not None
    decision = GateDecision(
        False,
        "",
        challenger_accuracy,
        champion_accuracy,
        floor,
        tolerance,
        challenger_ood_unknown,
        champion_ood_unknown,
        ood_tolerance if measured else None,
    )
    verdict = _accuracy_verdict(challenger_accuracy, champion_accuracy, floor, tolerance)
    if verdict is not None:
        return replace(decision, promote=verdict[0], reason=verdict[1])
    ok, text = _ood_verdict(challenger_ood_unknown, champion_ood_unknown, ood_tolerance)
    if not ok:
        return replace(decision, reason=text)
    reason = (
        f"accuracy {challenger_accuracy:.4f} >= floor {floor:.4f} and within {tolerance:.4f} "
        f"of (or above) the champion's {champion_accuracy:.4f}{text}"
    )
    return replace(decision, promote=True, reason=reason)


def judge(
    served: EvaluationReport,
    champion: EvaluationReport | None,
    settings: Settings,
    *,
    floor: float,
    tolerance: float,
    note: str = "",
) -> GateDecision:
    """:func:`promotion_gate` on the served challenger's report and the champion's on the
    same test split (``champion`` is ``served`` itself when the challenger is the champion
    already, None when there is no champion or it could not be scored); ``note`` (why the
    champion was not scored) ends the reason."""
    decision = promotion_gate(
        served.accuracy,
        champion.accuracy if champion is not None else None,
        floor=floor,
        tolerance=tolerance,
        challenger_ood_unknown=served.figure("ood_unknown_share"),
        champion_ood_unknown=None if champion is None else champion.figure("ood_unknown_share"),
        ood_tolerance=settings.promotion.promotion_ood_tolerance,
    )
    refused = source_refusals(served)
    answers = (
        served.figure("right_answers"),
        None if champion is None else champion.figure("right_answers"),
    )
    decision = replace(
        decision,
        challenger_right_answers=answers[0],
        champion_right_answers=answers[1],
        source_unknown={k: v[0] for k, v in refused.items()},
    )
    if decision.promote:
        ok, text = user_verdict(
            refused,
            settings.promotion.promotion_max_source_unknown,
            answers,
            settings.promotion.promotion_right_answers_tolerance,
        )
        decision = replace(
            decision,
            promote=ok,
            reason=decision.reason + text if ok else text,
        )
    return replace(decision, reason=decision.reason + note) if note else decision


def source_refusals(report: EvaluationReport) -> dict[str, tuple[float, int]]:
    """Per labelled source of ``report``: (share answered ``unknown``, how many photos)."""
    by_source = report.metrics.get("by_source") or {}
    return {
        str(origin): (
            float(f["unknown_share"]),
            round(float(f["unknown_share"]) * float(f["n"])),
        )
        for origin, f in by_source.items()
        if f.get("unknown_share") is not None and not math.isnan(f["unknown_share"])
    }


def tag_value(value: float | None) -> str:
    """A figure as a tag value (``none`` when missing)."""
    return "none" if value is None else f"{value:.6f}"


@dataclass(frozen=True)
class ServingChoice:
    """The runtime and precision a version is served with, and the figures behind it."""

    runtime: str
    precision: str
    reason: str
    tolerance: float
    """The ``int8_tolerance`` setting."""
    fp32: dict[str, float | None] = field(default_factory=dict)
    int8: dict[str, float | None] | None = None
    agreement: Agreement | None = None
    """INT8 versus FP32 on the dataset version's photos (None: not measured)."""
    test_tolerance: float | None = None
    """With an agreement: the tolerance INT8's test accuracy was held to, ``max(tolerance,
    1.5 / n)`` (:func:`figure_tolerance`; ROC AUC and the out-of-domain share count their
    own photos)."""

    def tags(self) -> dict[str, str]:
        """The version's ``serving.*`` tags (the Predictor serves ``serving.precision``)."""
        tags = {
            "runtime": self.runtime,
            "precision": self.precision,
            "reason": self.reason,
            "int8_tolerance": str(self.tolerance),
        }
        tags |= {f"fp32_{name}": tag_value(self.fp32.get(name)) for name in SERVING_FIGURES}
        if self.int8 is not None:
            tags |= {f"int8_{name}": tag_value(self.int8.get(name)) for name in SERVING_FIGURES}
        if self.test_tolerance is not None:
            tags["int8_test_tolerance"] = tag_value(self.test_tolerance)
        if self.agreement is not None:
            tags |= {name: str(value) for name, value in self.agreement_figures().items()}
        return {SERVING_TAG + k: v for k, v in tags.items()}

    def agreement_figures(self) -> dict[str, float]:
        """The agreement as figures (empty without one): ``int8_agreement`` (share of
        identical answers), ``int8_agreement_lower_bound``, ``int8_agreement_photos``,
        ``int8_max_probability_diff``."""
        a = self.agreement
        if a is None:
            return {}
        return {
            "int8_agreement": round(a.share, 6),
            "int8_agreement_lower_bound": round(a.lower_bound, 6),
            "int8_agreement_photos": a.photos,
            "int8_max_probability_diff": round(a.max_probability_diff, 6),
        }


def _figures(report: EvaluationReport) -> dict[str, float | None]:
    return {name: report.figure(name) for name in SERVING_FIGURES}


def _figure_count(report: EvaluationReport, name: str) -> float | None:
    """How many test photos one photo of ``name`` is counted against: the out-of-domain
    photos for the out-of-domain 'unknown' share; the smallest class for ROC AUC (one photo
    ranked anew moves it by at most one over its class's count); the labelled photos for
    accuracy."""
    count: float | None
    if name == "ood_unknown_share":
        count = report.figure("ood_count")
    elif name == "roc_auc" and report.metrics.get("confusion_matrix") is not None:
        count = float(np.asarray(report.metrics["confusion_matrix"]).sum(axis=1).min())
    else:
        count = report.figure("n")
    return count if count is not None and count > 0 else None


def figure_tolerance(report: EvaluationReport, name: str, tolerance: float) -> float:
    """How far an INT8 test figure may be from FP32's when an agreement judges INT8:
    ``max(tolerance, 1.5 / n)`` for a figure over ``n`` test photos (:func:`_figure_count`),
    so that one photo answered differently never decides on its own; a drop of two photos
    or more beyond ``tolerance`` still does."""
    count = _figure_count(report, name)
    return tolerance if count is None else max(tolerance, SLACK_PHOTOS / count)


def _agreement_refusal(agreement: Agreement, promotion: PromotionSettings) -> str | None:
    """Why the agreement does not let INT8 be served (None: it does)."""
    if agreement.photos == 0:
        return "INT8 agreement measured on no photo"
    if not agreement.lower_bound >= promotion.int8_min_agreement - EPS:
        return (
            f"INT8 answers {agreement.identical} of {agreement.photos} photos as FP32: lower "
            f"bound {agreement.lower_bound:.4f} < {promotion.int8_min_agreement:g}"
        )
    if not agreement.max_probability_diff <= promotion.int8_max_probability_diff + EPS:
        return (
            f"INT8 probabilities differ from FP32's by up to "
            f"{agreement.max_probability_diff:.3f} > {promotion.int8_max_probability_diff:g}"
        )
    return None


def _test_drift(
    fp32: EvaluationReport, quant: dict[str, float | None], tolerance: float, widen: bool
) -> tuple[str | None, str]:
    """(the reason INT8's test figures refuse it or None, a note on the largest difference):
    each figure within ``tolerance`` of FP32's, or within :func:`figure_tolerance` when
    ``widen``."""
    base = _figures(fp32)
    worst, worst_gap = None, -1.0
    for name in SERVING_FIGURES:
        a, b = base[name], quant[name]
        if a is None or b is None:
            continue
        allowed = figure_tolerance(fp32, name, tolerance) if widen else tolerance
        if not abs(a - b) <= allowed + EPS:
            return (
                f"INT8 test {name} {b:.4f} differs from FP32's {a:.4f} by more than {allowed:g}"
            ), ""
        if abs(a - b) > worst_gap:
            worst, worst_gap = name, abs(a - b)
    note = "" if worst is None else f"largest difference: {worst} {worst_gap:.4f}"
    return None, note


def serving_choice(
    fp32: EvaluationReport,
    int8: EvaluationReport | None,
    promotion: PromotionSettings,
    agreement: Agreement | None = None,
) -> ServingChoice:
    """The served precision, INT8 or FP32. ``int8`` None: the version has no INT8 artifact.

    With an ``agreement`` (INT8 versus FP32 on the dataset version's photos), INT8 is served
    when its one-sided 95 % lower bound of identical answers reaches ``int8_min_agreement``,
    no probability differs by more than ``int8_max_probability_diff``, and each labelled test
    figure (accuracy, ROC AUC and, for a model with an open-set detector, the out-of-domain
    'unknown' share) is within ``max(int8_tolerance, 1.5 / n)`` of FP32's, ``n`` the test
    photos the figure counts: one photo answered differently on a small test split never
    decides, a real drop still refuses INT8.

    Without one (scores saved before agreement was measured): each test figure within
    ``int8_tolerance`` of FP32's, either direction (a model that answers differently is not
    the model that was gated)."""
    tolerance = promotion.int8_tolerance
    base = _figures(fp32)
    if int8 is None:
        return ServingChoice("onnx", "fp32", "no INT8 artifact", tolerance, base)
    quant = _figures(int8)
    widen = agreement is not None
    allowed = figure_tolerance(fp32, "accuracy", tolerance) if widen else None
    choice = ServingChoice("onnx", "fp32", "", tolerance, base, quant, agreement, allowed)
    missing = [n for n in SERVING_FIGURES if (base[n] is None) != (quant[n] is None)]
    if missing:
        return replace(choice, reason=f"INT8 lacks {', '.join(missing)} that FP32 has")
    refusal = None if agreement is None else _agreement_refusal(agreement, promotion)
    if refusal is not None:
        return replace(choice, reason=refusal)
    refusal, note = _test_drift(fp32, quant, tolerance, widen)
    if refusal is not None:
        return replace(choice, reason=refusal)
    if agreement is None:
        largest = f" ({note})" if note else ""
        reason = f"INT8 test figures within {tolerance:g} of FP32's{largest}"
    else:
        reason = (
            f"INT8 answers {agreement.identical} of {agreement.photos} photos as FP32 (lower "
            f"bound {agreement.lower_bound:.4f} >= {promotion.int8_min_agreement:g}), largest "
            f"probability difference {agreement.max_probability_diff:.3f}; test figures "
            f"within their tolerance{f' ({note})' if note else ''}"
        )
    return replace(choice, precision="int8", reason=reason)


def serving_of(
    fp32: EvaluationReport,
    int8: EvaluationReport | None,
    *,
    keras_reason: str | None,
    promotion: PromotionSettings,
    agreement: Agreement | None = None,
) -> ServingChoice:
    """:func:`serving_choice`, or Keras in FP32 when the version was scored as Keras
    (``keras_reason`` says why: no usable ONNX artifact, or ``serving_runtime=keras``)."""
    if keras_reason is not None:
        tolerance = promotion.int8_tolerance
        return ServingChoice("keras", "fp32", keras_reason, tolerance, _figures(fp32))
    return serving_choice(fp32, int8, promotion, agreement)
