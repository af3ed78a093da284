"""Metrics: the figures of a model on labelled images, and the report that holds them.

* :func:`classification_metrics`: accuracy, macro precision / recall / F1, ROC AUC,
  expected calibration error (ECE), log loss and the confusion matrix.
* :func:`slice_metrics`: the same accuracy figures per slice (image size bucket,
  orientation, true label, source).
* :func:`answer_metrics`: **right answers**, the share of in-domain photos whose answer (what
  the user is told) is their true label, ``uncertain`` and ``unknown`` counted as not right;
  and per labelled source (the manifest's ``origin``): right answers, argmax accuracy, the
  shares answered ``unknown`` and ``uncertain``, ECE.
* :class:`EvaluationReport`: one model's metrics, slices and predictions on one set of images;
  :meth:`EvaluationReport.to_dict` / :meth:`EvaluationReport.from_dict` keep it as JSON (the
  saved scores of :mod:`dandelion_lib.lifecycle.scoring`).

Pure numbers: nothing here reads images or runs a model (:mod:`dandelion_lib.lifecycle.evaluate`
does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.metrics import roc_auc_score

from dandelion_lib.core.errors import DandelionError

ECE_BINS = 10
SIZE_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("short_side<180", 0, 180),
    ("short_side_180-223", 180, 224),
    ("short_side>=224", 224, 1 << 30),
)
"""Image size slices by the shorter side in pixels (small, typical, larger photos of the
reference data; every one is resized to the model input size)."""

SUMMARY_METRICS = (
    "right_answers",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "ece",
    "log_loss",
)
"""The figures :meth:`EvaluationReport.table` lists first."""

PREDICTION_COLUMNS = (
    "sha256",
    "path",
    "origin",
    "label",
    "predicted",
    "confidence",
    "answer",
    "ood_score",
)
"""The per-image columns a saved report keeps (those present)."""


class EvaluationError(DandelionError):
    """Nothing to evaluate, or the images cannot be read."""


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> list[tuple[float, float, float]]:
    """Per non-empty equal-width confidence bin: (share of images, mean confidence, accuracy)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out.append((mask.mean(), confidence[mask].mean(), correct[mask].mean()))
    return out


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by count."""
    if len(y_true) == 0:
        return 0.0
    ece = 0.0
    for share, confidence, accuracy in calibration_bins(y_true, probs, bins):
        ece += share * abs(accuracy - confidence)
    return float(ece)


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, labels: tuple[str, ...]
) -> dict[str, Any]:
    """Scalar metrics (floats) plus ``confusion_matrix`` (rows: true, columns: predicted)."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise EvaluationError("no labelled images to evaluate")
    y_pred = probs.argmax(axis=1)
    classes = list(range(len(labels)))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="macro", zero_division=0
    )
    out: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "log_loss": _log_loss(y_true, probs),
        "n": len(y_true),
    }
    per_p, per_r, per_f, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    for i, label in enumerate(labels):
        out[f"precision_{label}"] = float(per_p[i])
        out[f"recall_{label}"] = float(per_r[i])
        out[f"f1_{label}"] = float(per_f[i])
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=classes).tolist()
    return out


def _log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0)
    return float(-np.log(p).mean())


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (one-vs-rest beyond two labels); NaN when only one label is present."""
    if len(np.unique(y_true)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr"))


def size_bucket(width: int, height: int) -> str:
    short = min(int(width), int(height))
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= short < hi)


def orientation(width: int, height: int) -> str:
    if abs(width - height) <= 0.05 * max(width, height):
        return "square"
    return "landscape" if width > height else "portrait"


def slice_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per slice. ``frame`` has ``label``, ``predicted``, ``width``, ``height``."""
    shapes = list(zip(frame["width"], frame["height"], strict=True))
    f = frame.assign(
        correct=frame["label"] == frame["predicted"],
        size=[size_bucket(w, h) for w, h in shapes],
        orientation=[orientation(w, h) for w, h in shapes],
    )
    rows = [
        {
            "slice": f"{'source' if kind == 'origin' else kind}={value}",
            "n": len(part),
            "accuracy": float(part["correct"].mean()),
        }
        for kind in ("size", "orientation", "label", "origin")
        if kind in f
        for value, part in f.groupby(kind, sort=True)
    ]
    return pd.DataFrame(rows, columns=["slice", "n", "accuracy"])


SOURCE_FIGURES = ("n", "right_answers", "accuracy", "unknown_share", "uncertain_share", "ece")
"""The figures :func:`answer_metrics` gives per source."""


def _share(mask: Any) -> float:
    values = np.asarray(mask, dtype=bool)
    return float(values.mean()) if len(values) else float("nan")


def answer_metrics(
    frame: pd.DataFrame, probs: np.ndarray, labels: tuple[str, ...], *, unknown: str, uncertain: str
) -> dict[str, Any]:
    """``right_answers`` (share of ``frame``'s photos whose ``answer`` is their ``label``) and,
    when ``frame`` has an ``origin`` column, the same per source: ``by_source`` (origin ->
    :data:`SOURCE_FIGURES`), also flattened as ``source_<origin>_<figure>`` for MLflow, and
    ``max_source_unknown_share`` (the worst source's share answered ``unknown``)."""
    out: dict[str, Any] = {"right_answers": _share(frame["answer"] == frame["label"])}
    if "origin" not in frame or frame.empty:
        return out
    y_true = np.asarray([labels.index(lab) for lab in frame["label"]])
    by_source: dict[str, dict[str, float]] = {}
    for origin, part in frame.groupby("origin", sort=True):
        rows = part.index.to_numpy()
        by_source[str(origin)] = {
            "n": float(len(part)),
            "right_answers": _share(part["answer"] == part["label"]),
            "accuracy": _share(part["predicted"] == part["label"]),
            "unknown_share": _share(part["answer"] == unknown),
            "uncertain_share": _share(part["answer"] == uncertain),
            "ece": expected_calibration_error(y_true[rows], probs[rows]),
        }
    out["by_source"] = by_source
    out["max_source_unknown_share"] = max(f["unknown_share"] for f in by_source.values())
    for origin, figures in by_source.items():
        out |= {f"source_{origin}_{name}": value for name, value in figures.items()}
    return out


def _is_figure(value: Any) -> TypeGuard[int | float]:
    """A number worth showing or logging (NaN is not)."""
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


@dataclass
class EvaluationReport:
    """Metrics of one model on one set of labelled images."""

    model_uri: str | None
    model_version: str | None
    source: str
    labels: tuple[str, ...]
    metrics: dict[str, Any]
    slices: pd.DataFrame
    predictions: pd.DataFrame = field(repr=False)
    probabilities: np.ndarray = field(repr=False)

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    def figure(self, name: str) -> float | None:
        """One metric as a float, None when absent or NaN."""
        value = self.metrics.get(name)
        return float(value) if _is_figure(value) else None

    def scalar_metrics(self, prefix: str = "") -> dict[str, float]:
        """Float metrics, optionally prefixed (``test_accuracy``...), for MLflow."""
        return {f"{prefix}{k}": float(v) for k, v in self.metrics.items() if _is_figure(v)}

    def true_indices(self) -> np.ndarray:
        """The true label of each image, as an index into ``labels``."""
        return np.asarray([self.labels.index(lab) for lab in self.predictions["label"]])

    def table(self) -> str:
        """A plain-text metrics table (what the CLI prints)."""
        version = f" (version {self.model_version})" if self.model_version else ""
        lines = [
            f"model:   {self.model_uri or '-'}{version}",
            f"images:  {self.source} ({self.metrics['n']} images)",
            "",
            f"{'metric':<24}{'value':>10}",
        ]
        lines += [
            f"{name:<24}{self.metrics[name]:>10.4f}"
            for name in SUMMARY_METRICS
            if name in self.metrics
        ]
        for label in self.labels:
            for m in ("precision", "recall", "f1"):
                lines.append(f"{m + '_' + label:<24}{self.metrics[f'{m}_{label}']:>10.4f}")
        return "\n".join(
            lines
            + self._source_lines()
            + self._open_set_lines()
            + self._confusion_and_slice_lines()
        )

    def _source_lines(self) -> list[str]:
        by_source = self.metrics.get("by_source") or {}
        if not by_source:
            return []
        lines = ["", "per source (right answers: the answer is the true label)"]
        lines.append(f"{'source':<24}" + "".join(f"{n:>16}" for n in SOURCE_FIGURES))
        for origin, figures in by_source.items():
            cells = "".join(
                f"{figures.get(n, float('nan')):>16.0f}"
                if n == "n"
                else f"{figures.get(n, float('nan')):>16.4f}"
                for n in SOURCE_FIGURES
            )
            lines.append(f"{origin:<24}{cells}")
        return lines

    def _open_set_lines(self) -> list[str]:
        names = [
            k
            for k in self.metrics
            if k.startswith("ood_") or k in ("in_domain_unknown_share", "answered_accuracy")
        ]
        if not names:
            return []
        lines = ["", "open set (out-of-domain photos answered 'unknown')"]
        for k in names:
            value = self.metrics[k]
            if isinstance(value, float) and not math.isnan(value):
                lines.append(f"{k:<32}{value:>10.4f}")
        return lines

    def _confusion_and_slice_lines(self) -> list[str]:
        lines = ["", "confusion matrix (rows: true, columns: predicted)"]
        width = max(len(lab) for lab in self.labels) + 2
        lines.append(" " * width + "".join(f"{lab:>{width}}" for lab in self.labels))
        for lab, row in zip(self.labels, self.metrics["confusion_matrix"], strict=True):
            lines.append(f"{lab:<{width}}" + "".join(f"{v:>{width}}" for v in row))
        lines += ["", f"{'slice':<32}{'n':>6}{'accuracy':>10}"]
        for r in self.slices.itertuples():
            lines.append(f"{r.slice:<32}{r.n:>6}{r.accuracy:>10.4f}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: metrics, slices, the per-image answers and probabilities (not the image
        metadata beyond :data:`PREDICTION_COLUMNS`)."""
        columns = [c for c in PREDICTION_COLUMNS if c in self.predictions.columns]
        predictions = self.predictions[columns].astype(object)
        return {
            "model_uri": self.model_uri,
            "model_version": self.model_version,
            "source": self.source,
            "labels": list(self.labels),
            "metrics": self.metrics,
            "slices": self.slices.to_dict("records"),
            "predictions": predictions.where(predictions.notna(), None).to_dict("list"),
            "probabilities": np.asarray(self.probabilities, dtype=np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """The report :meth:`to_dict` wrote."""
        labels = tuple(data["labels"])
        predictions = pd.DataFrame(data["predictions"])
        if "ood_score" in predictions:
            predictions["ood_score"] = predictions["ood_score"].astype(float)
        return cls(
            model_uri=data.get("model_uri"),
            model_version=data.get("model_version"),
            source=data["source"],
            labels=labels,
            metrics=dict(data["metrics"]),
            slices=pd.DataFrame(data["slices"], columns=["slice", "n", "accuracy"]),
            predictions=predictions,
            probabilities=np.asarray(data["probabilities"], dtype=np.float64).reshape(
                -1, len(labels)
            ),
        )
