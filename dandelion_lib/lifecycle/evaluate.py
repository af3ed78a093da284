"""Evaluation: a model scored on labelled images through the serving path.

* :func:`evaluate_arrays` scores model inputs with their labels (training's evaluation);
* :func:`evaluate_split` scores a model on a split of a dataset version from the store;
* :func:`evaluate_folder` scores any labelled folder (``DIR/<label>/*``), which is what
  ``dandelion evaluate --images DIR`` does.
* Open-set figures (a model with an out-of-domain detector): the share of in-domain photos
  wrongly answered ``unknown`` and the accuracy on those answered; with out-of-domain photos
  (the ``negatives`` of the split, or ``--negatives DIR``) also ROC AUC in-domain vs
  out-of-domain and the share of them answered ``unknown``, overall and per kind
  (:func:`dandelion_lib.training.openset.ood_metrics`; keys ``ood_*``, ``in_domain_unknown_share``,
  ``answered_accuracy``).

The figures themselves are :mod:`dandelion_lib.lifecycle.metrics`; the plots and their logging
:mod:`dandelion_lib.lifecycle.figures`. Scoring always goes through
:class:`dandelion_lib.serving.predict.Predictor`, the serving path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from dandelion_lib.core.features import to_model_input
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image
from dandelion_lib.data import dataset
from dandelion_lib.lifecycle.metrics import (
    EvaluationError,
    EvaluationReport,
    answer_metrics,
    classification_metrics,
    slice_metrics,
)
from dandelion_lib.serving.predict import AnswerPolicy, Prediction
from dandelion_lib.training import openset
from dandelion_lib.training.inputs import Pixels, StoredPixels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

Negatives = tuple[Pixels | None, list[str]]
"""Model inputs of out-of-domain photos (None: none) and their kinds."""


def evaluate_arrays(
    predictor: Any,
    pixels: Pixels,
    y_true: np.ndarray,
    meta: pd.DataFrame,
    *,
    source: str,
    batch_size: int = 32,
    negatives: Negatives | None = None,
) -> EvaluationReport:
    """Score model inputs (``(N, size, size, 3)``: an array, or :class:`StoredPixels` read
    batch by batch) with their labels and metadata.

    ``meta`` has one row per image with at least ``width`` and ``height`` (original size).
    ``negatives`` (model inputs of out-of-domain photos and their kinds) adds the open-set
    figures for a predictor with a detector. The ``answer`` column is what the user would
    be told (a label, ``uncertain`` or ``unknown``).
    """
    labels = tuple(predictor.labels)
    preds = predict_all(predictor, pixels, batch_size)
    probs = probability_matrix(preds, labels)
    pred = probs.argmax(axis=1)
    policy: AnswerPolicy = getattr(predictor, "policy", AnswerPolicy())
    frame = meta.reset_index(drop=True).assign(
        label=[labels[i] for i in y_true],
        predicted=[labels[i] for i in pred],
        confidence=probs.max(axis=1),
        answer=[policy.decide(p).label for p in preds],
        ood_score=[np.nan if p.ood_score is None else p.ood_score for p in preds],
    )
    metrics = classification_metrics(y_true, probs, labels)
    metrics["uncertain_share"] = (
        float(np.mean(frame["answer"] == policy.uncertain)) if len(frame) else 0.0
    )
    metrics |= answer_metrics(
        frame, probs, labels, unknown=policy.unknown, uncertain=policy.uncertain
    )
    if policy.ood_threshold is not None and _all_scored(preds):
        in_correct = pred == np.asarray(y_true)
        metrics |= _open_set_metrics(
            predictor, frame, policy.ood_threshold, negatives, in_correct, batch_size
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


def _all_scored(preds: list[Prediction]) -> bool:
    """Whether there are predictions and every one has an out-of-domain score."""
    return bool(preds) and all(p.ood_score is not None for p in preds)


def _open_set_metrics(
    predictor: Any,
    frame: pd.DataFrame,
    threshold: float,
    negatives: Negatives | None,
    in_correct: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
    """The open-set figures: in-domain scores of ``frame``, out-of-domain ones of
    ``negatives`` (scored here) when there are any."""
    neg_pixels, kinds = negatives if negatives is not None else (None, [])
    neg_scores: list[float] = []
    if neg_pixels is not None and len(neg_pixels):
        neg_preds = predict_all(predictor, neg_pixels, batch_size)
        neg_scores = [float(p.ood_score or 0.0) for p in neg_preds]
    return openset.ood_metrics(
        frame["ood_score"].to_numpy(),
        np.asarray(neg_scores),
        threshold,
        ood_groups=kinds if neg_scores else None,
        in_correct=in_correct,
    )


def predict_all(predictor: Any, pixels: Pixels, batch_size: int = 32) -> list[Prediction]:
    """The predictor's :class:`~dandelion_lib.serving.predict.Prediction` of every input, in batches."""
    out: list[Prediction] = []
    for start in range(0, len(pixels), batch_size):
        batch = np.asarray(pixels[start : start + batch_size], dtype=np.float32)
        out += predictor.predict_arrays(batch)
    return out


def probability_matrix(preds: list[Prediction], labels: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """The predictions' class probabilities, ``n x labels``, in ``labels`` order."""
    if not preds:
        return np.zeros((0, len(labels)))
    return np.asarray([[p.probabilities[lab] for lab in labels] for p in preds], dtype=np.float64)


def evaluate_split(
    predictor: Any, store: Any, version: str, split: str = "test", *, manifest: Any = None
) -> EvaluationReport:
    """Score ``predictor`` on one split of a dataset version from the store; images are read
    batch by batch, so memory does not grow with the split."""
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
    pixels = StoredPixels(store, rows, predictor.spec)
    y = np.asarray([labels.index(lab) for lab in rows["label"]])
    negatives = None
    if len(neg) and getattr(predictor, "detector", None) is not None:
        kinds = [dataset.negative_kind(s) for s in neg["source"]]
        negatives = (StoredPixels(store, neg, predictor.spec), kinds)
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
    predictor: Any, found: list[tuple[Path, str]], skipped: list[str], origin: str = ""
) -> tuple[list[np.ndarray], list[str], list[dict[str, Any]]]:
    """Model inputs, labels (or kinds) and metadata (``origin``: the source's name) of
    readable images; others -> skipped."""
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
        meta.append({"path": str(path), "origin": origin, "width": img.width, "height": img.height})
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
    out-of-domain photos, ``negatives/<kind>/*``); returns the report and skipped files. The
    folder is one source, named after it in the per-source figures."""
    labels = tuple(predictor.labels)
    skipped: list[str] = []
    origin = Path(root).resolve().name or str(root)
    pixels, names, meta = _read_folder(
        predictor, list_labelled_folder(root, labels), skipped, origin
    )
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
