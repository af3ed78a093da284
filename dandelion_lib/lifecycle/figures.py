"""Figures of an evaluation (confusion matrix, ROC, calibration, misclassified images) and
of a training (learning curves), and :func:`log_report`, which logs a report's metrics, slices
and figures into the active MLflow run."""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from sklearn.metrics import roc_curve

from dandelion_lib.lifecycle.metrics import (
    ECE_BINS,
    EvaluationReport,
    calibration_bins,
    expected_calibration_error,
    roc_auc,
)
from dandelion_lib.training.inputs import Pixels


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
        ax.plot(fpr, tpr, label=f"{labels[positive]} vs rest (AUC {roc_auc(y_true, probs):.3f})")
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
    per_bin = calibration_bins(y_true, probs, bins)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.plot([c for _, c, _ in per_bin], [a for _, _, a in per_bin], "o-")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"calibration (ECE {expected_calibration_error(y_true, probs, bins):.3f})")
    fig.tight_layout()
    return fig


def misclassified_figure(pixels: Pixels, report: EvaluationReport, max_images: int = 16) -> Any:
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


def report_figures(report: EvaluationReport) -> dict[str, Any]:
    """The confusion matrix, ROC and calibration figures of a report, by name."""
    y = report.true_indices()
    return {
        "confusion_matrix": confusion_figure(report.metrics["confusion_matrix"], report.labels),
        "roc": roc_figure(y, report.probabilities, report.labels),
        "calibration": calibration_figure(y, report.probabilities),
    }


def log_report(
    report: EvaluationReport, pixels: Pixels | None = None, prefix: str = "test_"
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
    figures = report_figures(report)
    if pixels is not None:
        figures["misclassified"] = misclassified_figure(pixels, report)
    for name, fig in figures.items():
        mlflow.log_figure(fig, f"figures/{prefix}{name}.png")
        plt.close(fig)


def _metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text)


def log_learning_curves(history: dict[str, list[float]]) -> None:
    """The learning curves of a training, logged into the active MLflow run."""
    fig = learning_curves_figure(history)
    mlflow.log_figure(fig, "figures/learning_curves.png")
    plt.close(fig)


def learning_curves_figure(history: dict[str, list[float]]) -> Any:
    """Loss and accuracy per epoch (train and validation)."""

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--"), (f"refit_{metric}", ":")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        phases = history.get("phase", [])
        if phases and max(phases) > 0:
            ax.axvline(phases.index(1.0) + 0.5, color="grey", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
