"""Evaluation: metrics of a model on labelled images, per slice, with figures.

* :func:`classification_metrics`: accuracy, macro precision / recall / F1, ROC AUC,
  expected calibration error (ECE), log loss and the confusion matrix.
* :func:`slice_metrics`: the same accuracy figures per slice (image size bucket,
  orientation, true label).
* :func:`evaluate_split` scores a model on a split of a dataset version from the store;
  :func:`evaluate_folder` scores any labelled folder (``DIR/<label>/*``), which is what
  ``dandelion evaluate --images DIR`` does.
* Open-set figures (a model with an out-of-domain detector): the share of in-domain photos
  wrongly answered ``unknown`` and the accuracy on those answered; with out-of-domain photos
  (the ``negatives`` of the split, or ``--negatives DIR``) also ROC AUC in-domain vs
  out-of-domain and the share of them answered ``unknown``, overall and per kind
  (:func:`dandelion_lib.training.openset.ood_metrics`; keys ``ood_*``, ``in_domain_unknown_share``,
  ``answered_accuracy``).

Scoring always goes through :class:`dandelion_lib.serving.predict.Predictor`, the serving path.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn import metrics as skm
from sklearn.metrics import roc_auc_score, roc_curve

from dandelion_lib.core.config import get_settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import to_model_input
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image
from dandelion_lib.core.storage import open_store
from dandelion_lib.data import dataset
from dandelion_lib.lifecycle import registry
from dandelion_lib.serving.predict import AnswerPolicy, Prediction, Predictor
from dandelion_lib.training import openset

ECE_BINS = 10
SIZE_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("short_side<180", 0, 180),
    ("short_side_180-223", 180, 224),
    ("short_side>=224", 224, 1 << 30),
)
"""Image size slices by the shorter side in pixels (small, typical, larger photos of the
reference data; every one is resized to the model input size)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class EvaluationError(DandelionError):
    """Nothing to evaluate, or the images cannot be read."""


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by count."""
    if len(y_true) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
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
        "roc_auc": _roc_auc(y_true, probs),
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


def _roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:

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
    f = frame.assign(
        correct=frame["label"] == frame["predicted"],
        size=[size_bucket(w, h) for w, h in zip(frame["width"], frame["height"], strict=True)],
        orientation=[
            orientation(w, h) for w, h in zip(frame["width"], frame["height"], strict=True)
        ],
    )
    rows = []
    for kind in ("size", "orientation", "label"):
        for value, part in f.groupby(kind, sort=True):
            rows.append(
                {
                    "slice": f"{kind}={value}",
                    "n": len(part),
                    "accuracy": float(part["correct"].mean()),
                }
            )
    return pd.DataFrame(rows, columns=["slice", "n", "accuracy"])


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

    def scalar_metrics(self, prefix: str = "") -> dict[str, float]:
        """Float metrics, optionally prefixed (``test_accuracy``...), for MLflow."""
        return {
            f"{prefix}{k}": float(v)
            for k, v in self.metrics.items()
            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))
        }

    def table(self) -> str:
        """A plain-text metrics table (what the CLI prints)."""
        lines = [
            f"model:   {self.model_uri or '-'}"
            + (f" (version {self.model_version})" if self.model_version else ""),
            f"images:  {self.source} ({self.metrics['n']} images)",
            "",
            f"{'metric':<24}{'value':>10}",
        ]
        for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "ece", "log_loss"):
            lines.append(f"{name:<24}{self.metrics[name]:>10.4f}")
        for label in self.labels:
            for m in ("precision", "recall", "f1"):
                lines.append(f"{m + '_' + label:<24}{self.metrics[f'{m}_{label}']:>10.4f}")
        open_set = [
            k
            for k in self.metrics
            if k.startswith("ood_") or k in ("in_domain_unknown_share", "answered_accuracy")
        ]
        if open_set:
            lines += ["", "open set (out-of-domain photos answered 'unknown')"]
            for k in open_set:
                value = self.metrics[k]
                if isinstance(value, float) and not math.isnan(value):
                    lines.append(f"{k:<32}{value:>10.4f}")
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        width = max(len(lab) for lab in self.labels) + 2
        lines.append(" " * width + "".join(f"{lab:>{width}}" for lab in self.labels))
        for lab, row in zip(self.labels, self.metrics["confusion_matrix"], strict=True):
            lines.append(f"{lab:<{width}}" + "".join(f"{v:>{width}}" for v in row))
        lines += ["", f"{'slice':<32}{'n':>6}{'accuracy':>10}"]
        for r in self.slices.itertuples():
            lines.append(f"{r.slice:<32}{r.n:>6}{r.accuracy:>10.4f}")
        return "\n".join(lines)


def evaluate_arrays(
    predictor: Any,
    pixels: np.ndarray,
    y_true: np.ndarray,
    meta: pd.DataFrame,
    *,
    source: str,
    batch_size: int = 32,
    negatives: tuple[np.ndarray | None, list[str]] | None = None,
) -> EvaluationReport:
    """Score model inputs (``(N, size, size, 3)``) with their labels and metadata.

    ``meta`` has one row per image with at least ``width`` and ``height`` (original size).
    ``negatives`` (model inputs of out-of-domain photos and their kinds) adds the open-set
    figures for a predictor with a detector. The ``answer`` column is what the user would
    be told (a label, ``uncertain`` or ``unknown``).
    """
    labels = tuple(predictor.labels)
    preds = predict_all(predictor, pixels, batch_size)
    probs = _probabilities(preds, labels)
    pred = probs.argmax(axis=1)
    policy: AnswerPolicy = getattr(predictor, "policy", AnswerPolicy())
    frame = meta.reset_index(drop=True).assign(
        label=[labels[i] for i in y_true],
        predicted=[labels[i] for i in pred],
        confidence=probs.max(axis=1),
        answer=[policy.answer(p) for p in preds],
        ood_score=[np.nan if p.ood_score is None else p.ood_score for p in preds],
    )
    metrics = classification_metrics(y_true, probs, labels)
    metrics["uncertain_share"] = (
        float(np.mean(frame["answer"] == policy.uncertain)) if len(frame) else 0.0
    )
    if policy.ood_threshold is not None and preds and all(p.ood_score is not None for p in preds):
        neg_pixels, kinds = negatives if negatives is not None else (None, [])
        neg_scores: list[float] = []
        if neg_pixels is not None and len(neg_pixels):
            neg_scores = [
                float(p.ood_score or 0.0) for p in predict_all(predictor, neg_pixels, batch_size)
            ]
        metrics |= openset.ood_metrics(
            frame["ood_score"].to_numpy(),
            np.asarray(neg_scores),
            policy.ood_threshold,
            ood_groups=kinds if neg_scores else None,
            in_correct=pred == np.asarray(y_true),
        )
    return EvaluationReport(
        model_uri=getattr(predictor, "uri", None),
        model_version=getattr(predictor, "version", None),
        source=source,
        labels=labels,
        metrics=metrics,
        slices=slice_metrics(frame),
        predictions=frame,
        probabilities=probs,
    )


def predict_all(predictor: Any, pixels: np.ndarray, batch_size: int = 32) -> list[Prediction]:
    """The predictor's :class:`~dandelion_lib.serving.predict.Prediction` of every input, in batches."""
    out: list[Prediction] = []
    for start in range(0, len(pixels), batch_size):
        batch = np.asarray(pixels[start : start + batch_size], dtype=np.float32)
        out += predictor.predict_arrays(batch)
    return out


def _probabilities(preds: list[Prediction], labels: tuple[str, ...]) -> npt.NDArray[np.float64]:
    if not preds:
        return np.zeros((0, len(labels)))
    return np.asarray([[p.probabilities[lab] for lab in labels] for p in preds], dtype=np.float64)


def evaluate_split(
    predictor: Any, store: Any, version: str, split: str = "test", *, manifest: Any = None
) -> EvaluationReport:
    """Score ``predictor`` on one split of a dataset version from the store."""
    manifest = manifest if manifest is not None else dataset.load_manifest(store, version)
    rows = manifest[manifest["split"] == split].sort_values("sha256").reset_index(drop=True)
    negative = dataset.is_negative(rows)
    rows, neg = rows[~negative].reset_index(drop=True), rows[negative].reset_index(drop=True)
    if rows.empty:
        raise EvaluationError(f"dataset version {version} has no {split!r} images")
    labels = tuple(predictor.labels)
    unknown = sorted(set(rows["label"]) - set(labels))
    if unknown:
        raise EvaluationError(f"dataset labels {unknown} are not model labels {list(labels)}")
    pixels = dataset.load_examples(store, rows, predictor.spec)
    y = np.asarray([labels.index(lab) for lab in rows["label"]])
    negatives = None
    if len(neg) and getattr(predictor, "detector", None) is not None:
        kinds = [dataset.negative_kind(s) for s in neg["source"]]
        negatives = (dataset.load_examples(store, neg, predictor.spec), kinds)
    return evaluate_arrays(
        predictor,
        pixels,
        y,
        rows,
        source=f"dataset {version} ({split} split)",
        negatives=negatives,
    )


def list_labelled_folder(root: str | Path, labels: tuple[str, ...]) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image file under ``root/<label>/`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"image folder not found: {root}")
    found = [
        (p, label)
        for label in labels
        if (root / label).is_dir()
        for p in sorted((root / label).rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise EvaluationError(
            f"no images in {root}: expected one sub-folder per label ({', '.join(labels)})"
        )
    return found


def _read_folder(
    predictor: Any, found: list[tuple[Path, str]], skipped: list[str]
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]]]:
    """Model inputs, labels (or kinds) and metadata of readable images; others -> skipped."""
    # The predictor's own acceptance rule (see Predictor.decode), keeping the image size.
    limits = ImageLimits(max_pixels=predictor.max_pixels, min_side=predictor.min_side)
    pixels, names, meta = [], [], []
    for path, name in found:
        try:
            img = accept_image(path.read_bytes(), limits).image
        except (InvalidImageError, OSError) as exc:
            skipped.append(f"{path}: {exc}")
            continue
        pixels.append(to_model_input(img, predictor.spec))
        names.append(name)
        meta.append({"path": str(path), "width": img.width, "height": img.height})
    return pixels, names, meta


def list_negatives_folder(root: str | Path) -> list[tuple[Path, str]]:
    """``(path, kind)`` for every image file under ``root/<kind>/`` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"image folder not found: {root}")
    found = [
        (p, kind.name)
        for kind in sorted(root.iterdir())
        if kind.is_dir() and not kind.name.startswith(".")
        for p in sorted(kind.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise EvaluationError(f"no images in {root}: expected one sub-folder per kind of photo")
    return found


def evaluate_folder(
    predictor: Any, root: str | Path, negatives: str | Path | None = None
) -> tuple[EvaluationReport, list[str]]:
    """Score every image of a labelled folder (and, for the open-set figures, of a folder of
    out-of-domain photos, ``negatives/<kind>/*``); returns the report and skipped files."""
    labels = tuple(predictor.labels)
    skipped: list[str] = []
    pixels, names, meta = _read_folder(predictor, list_labelled_folder(root, labels), skipped)
    if not pixels:
        raise EvaluationError(f"no readable images in {root}")
    neg = None
    if negatives is not None:
        neg_pixels, kinds, _ = _read_folder(predictor, list_negatives_folder(negatives), skipped)
        neg = (np.stack(neg_pixels) if neg_pixels else None, kinds)
    report = evaluate_arrays(
        predictor,
        np.stack(pixels),
        np.asarray([labels.index(n) for n in names]),
        pd.DataFrame(meta),
        source=str(root),
        negatives=neg,
    )
    return report, skipped


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def confusion_figure(matrix: list[list[int]], labels: tuple[str, ...]) -> Any:

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j, i, str(v), ha="center", va="center", color="black" if v < m.max() / 2 else "white"
        )
    ax.set_title("confusion matrix")
    fig.tight_layout()
    return fig


def roc_figure(y_true: Any, probs: np.ndarray, labels: tuple[str, ...]) -> Any:

    y_true = np.asarray(y_true, dtype=int)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    positive = len(labels) - 1
    if len(np.unique(y_true)) > 1:
        fpr, tpr, _ = roc_curve(y_true == positive, probs[:, positive])
        ax.plot(fpr, tpr, label=f"{labels[positive]} vs rest (AUC {_roc_auc(y_true, probs):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def calibration_figure(y_true: Any, probs: np.ndarray, bins: int = ECE_BINS) -> Any:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect)."""

    y_true = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    centers, accuracy = [], []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            centers.append(confidence[mask].mean())
            accuracy.append(correct[mask].mean())
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.plot(centers, accuracy, "o-")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"calibration (ECE {expected_calibration_error(y_true, probs, bins):.3f})")
    fig.tight_layout()
    return fig


def misclassified_figure(pixels: np.ndarray, report: EvaluationReport, max_images: int = 16) -> Any:
    """A grid of misclassified images, titled ``true -> predicted (confidence)``."""

    frame = report.predictions
    wrong = np.flatnonzero((frame["label"] != frame["predicted"]).to_numpy())[:max_images]
    cols = 4
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        ax.imshow(np.asarray(pixels[i], dtype=np.uint8))
        r = frame.iloc[i]
        ax.set_title(f"{r['label']} -> {r['predicted']} ({r['confidence']:.2f})", fontsize=7)
    fig.suptitle(f"misclassified: {len(wrong)} shown" if len(wrong) else "no misclassified images")
    fig.tight_layout()
    return fig


def log_report(
    report: EvaluationReport, pixels: np.ndarray | None = None, prefix: str = "test_"
) -> None:
    """Log a report's metrics, slices and figures into the active MLflow run."""

    mlflow.log_metrics(report.scalar_metrics(prefix))
    mlflow.log_metrics(
        {
            f"{prefix}slice_{_metric_name(str(name))}_accuracy": float(acc)
            for name, acc in zip(report.slices["slice"], report.slices["accuracy"], strict=True)
        }
    )
    mlflow.log_dict(
        {"metrics": report.metrics, "slices": report.slices.to_dict("records")},
        f"evaluation/{prefix or 'eval_'}metrics.json",
    )
    y = np.asarray([report.labels.index(lab) for lab in report.predictions["label"]])
    figures = {
        "confusion_matrix": confusion_figure(report.metrics["confusion_matrix"], report.labels),
        "roc": roc_figure(y, report.probabilities, report.labels),
        "calibration": calibration_figure(y, report.probabilities),
    }
    if pixels is not None:
        figures["misclassified"] = misclassified_figure(pixels, report)
    for name, fig in figures.items():
        mlflow.log_figure(fig, f"figures/{prefix}{name}.png")
        plt.close(fig)


def _metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text)


# --------------------------------------------------------------------------------------
# CLI: dandelion evaluate
# --------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model URI (default: models:/<DANDELION_MODEL_NAME>@champion)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--images", help="labelled folder: DIR/<label>/<image files>")
    where.add_argument(
        "--dataset-version",
        help="score the test split of this dataset version (default: the model's own)",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--negatives",
        help="with --images: folder of photos that are neither class, DIR/<kind>/<files>",
    )
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")


def cli(args: argparse.Namespace) -> int:
    settings = get_settings()
    registry.configure_mlflow(settings)
    uri = args.model or registry.model_uri(settings.model_name, registry.CHAMPION)
    predictor = Predictor.load(
        uri,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        policy=AnswerPolicy.from_settings(settings),
    )
    skipped: list[str] = []
    if args.negatives and not args.images:
        raise EvaluationError("--negatives goes with --images (a dataset split has its own)")
    if args.images:
        report, skipped = evaluate_folder(predictor, args.images, args.negatives)
    else:
        version = args.dataset_version or predictor.dataset_version
        if not version:
            raise EvaluationError(f"{uri} records no dataset version; pass --dataset-version")
        report = evaluate_split(predictor, open_store(settings=settings), version, args.split)
    if args.json:
        print(json.dumps({"metrics": report.metrics, "slices": report.slices.to_dict("records")}))
    else:
        print(report.table())
    for line in skipped:
        print(f"skipped {line}")
    return 0
