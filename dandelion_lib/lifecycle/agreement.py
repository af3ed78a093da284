"""Agreement: how often INT8 gives the same answer as FP32, on many photos.

The promotion gate serves INT8 only when it behaves as the FP32 model that was judged. A few
dozen test photos cannot show that (one flipped photo in 60 is 1.7 points), but agreement
needs no labels: :func:`measure_agreement` runs both precisions on every photo of a dataset
version (each split and the negatives, up to a limit) and counts identical answers (a label,
``uncertain`` or ``unknown``, as :class:`~dandelion_lib.serving.predict.AnswerPolicy` decides)
and the largest probability difference. :func:`wilson_lower_bound` turns the count into a
bound the gate can compare with ``int8_min_agreement``
(:func:`dandelion_lib.lifecycle.gate.serving_choice`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from dandelion_lib.data import dataset
from dandelion_lib.lifecycle.evaluate import predict_all, probability_matrix
from dandelion_lib.lifecycle.metrics import EvaluationReport
from dandelion_lib.serving.predict import Prediction

PARTS = ("test", "negatives", "val", "train")
"""The order photos are compared in (the first ``limit`` count): the test split's labelled
photos first, then every negative (label ``unknown``, whatever its split), then the
validation and the training split."""

CHUNK = 128
"""Photos loaded and run at a time (bounds memory on a large dataset version)."""

Z_95 = 1.645
"""The one-sided 95 % normal quantile."""


def wilson_lower_bound(k: int, n: int, z: float = Z_95) -> float:
    """The Wilson score lower bound of a share of ``k`` successes in ``n`` trials (one-sided,
    95 % with the default ``z``); 0.0 when there are no trials. Unlike ``k / n`` it grows
    with ``n``: 60 of 60 gives 0.957, 900 of 900 gives 0.997."""
    if n <= 0:
        return 0.0
    if not 0 <= k <= n:
        raise ValueError(f"successes {k} must be between 0 and the trials {n}")
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


@dataclass(frozen=True)
class Agreement:
    """INT8 versus FP32 on the same photos: identical answers and probability differences."""

    photos: int
    """Photos compared."""
    identical: int
    """Photos both precisions answer the same (label, ``uncertain`` or ``unknown``)."""
    max_probability_diff: float
    """The largest absolute difference of a probability, over photos and labels."""
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per part (``test``, ``negatives``, ``val``, ``train``): (photos, identical answers)."""

    @property
    def share(self) -> float:
        """The share of identical answers (0.0 when no photo was compared)."""
        return self.identical / self.photos if self.photos else 0.0

    @property
    def lower_bound(self) -> float:
        """The one-sided 95 % Wilson lower bound of :attr:`share`."""
        return wilson_lower_bound(self.identical, self.photos)

    @property
    def differing(self) -> int:
        return self.photos - self.identical

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (``share`` and ``lower_bound`` included for readers)."""
        return {
            "photos": self.photos,
            "identical": self.identical,
            "share": self.share,
            "lower_bound": self.lower_bound,
            "max_probability_diff": self.max_probability_diff,
            "parts": {k: {"photos": n, "identical": i} for k, (n, i) in self.parts.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Agreement:
        """The agreement :meth:`to_dict` wrote (share and bound are recomputed)."""
        parts = data.get("parts") or {}
        return cls(
            photos=int(data["photos"]),
            identical=int(data["identical"]),
            max_probability_diff=float(data["max_probability_diff"]),
            parts={str(k): (int(v["photos"]), int(v["identical"])) for k, v in parts.items()},
        )

    def describe(self) -> str:
        """One line: ``899 of 900 photos answered as FP32 (...)``."""
        return (
            f"{self.identical} of {self.photos} photos answered as FP32 (lower bound "
            f"{self.lower_bound:.4f}), largest probability difference "
            f"{self.max_probability_diff:.3f}"
        )


@dataclass(frozen=True)
class Answered:
    """Photos both precisions have already answered (the test split, scored in each): per
    sha256, whether the answers are identical, and the largest probability difference that
    counts (0.0 where FP32 answered ``unknown``, as in :func:`measure_agreement`)."""

    identical: dict[str, bool] = field(default_factory=dict)
    difference: dict[str, float] = field(default_factory=dict)


def answered_in_reports(fp32: EvaluationReport, int8: EvaluationReport, unknown: str) -> Answered:
    """What two reports of one model on the same photos (FP32's and INT8's) already compare,
    so that :func:`measure_agreement` does not run those photos again. Nothing when the
    reports are not on the same photos in the same order, or name other labels."""
    a, b = fp32.predictions, int8.predictions
    if (
        fp32.labels != int8.labels
        or "sha256" not in a
        or "sha256" not in b
        or a["sha256"].tolist() != b["sha256"].tolist()
        or np.shape(fp32.probabilities) != np.shape(int8.probabilities)
        or len(a) != len(fp32.probabilities)
    ):
        return Answered()
    answers = a["answer"].to_numpy()
    largest = shown_differences(fp32.probabilities, int8.probabilities, answers != unknown)
    keys = a["sha256"].astype(str).tolist()
    same = answers == b["answer"].to_numpy()
    return Answered(
        dict(zip(keys, same.tolist(), strict=True)),
        dict(zip(keys, largest.tolist(), strict=True)),
    )


def comparison_rows(manifest: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The manifest rows to compare, in :data:`PARTS` order (each part by sha256), one per
    photo, at most ``limit``; column ``part`` names the part of each."""
    negative = dataset.is_negative(manifest)
    frames = []
    for part in PARTS:
        mask = negative if part == "negatives" else ~negative & (manifest["split"] == part)
        frames.append(manifest[mask].sort_values("sha256").assign(part=part))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates("sha256")
    return rows.head(max(limit, 0)).reset_index(drop=True)


def _chunks(rows: pd.DataFrame) -> Iterator[pd.DataFrame]:
    for start in range(0, len(rows), CHUNK):
        yield rows.iloc[start : start + CHUNK]


def _answers(predictor: Any, preds: list[Prediction]) -> list[str]:
    return [predictor.policy.decide(p).label for p in preds]


def shown_differences(fp32: Any, int8: Any, shown: Any) -> npt.NDArray[np.float64]:
    """Per photo, the largest difference between FP32's and INT8's class probabilities
    (``n x classes`` each), counted only where FP32's answer does not say ``unknown``
    (``shown``), else 0. For a photo answered ``unknown`` the class probabilities mean
    nothing (it is neither class); whether INT8 answers it ``unknown`` too is counted by the
    identical answers."""
    diff = np.abs(np.asarray(fp32, np.float64) - np.asarray(int8, np.float64))
    return np.where(np.asarray(shown, bool), diff.max(axis=1, initial=0.0), 0.0)


def measure_agreement(
    fp32: Any,
    int8: Any,
    store: Any,
    manifest: pd.DataFrame,
    *,
    limit: int,
    answered: Answered | None = None,
) -> Agreement:
    """Run ``fp32`` and ``int8`` (two Predictors of one model version) on the photos of a
    dataset version (``manifest``: every split and the negatives, test split first, at most
    ``limit`` photos, :func:`comparison_rows`) and compare their answers, and their
    probabilities where FP32 does not answer ``unknown``. Labels are not needed: only whether
    both precisions answer alike. Photos in ``answered`` (the test split's reports,
    :func:`answered_in_reports`) count as they were answered there and are not run again."""
    rows = comparison_rows(manifest, limit)
    known = answered or Answered()
    done = rows["sha256"].isin(list(known.identical)).to_numpy()
    reused = rows["sha256"][done].tolist()
    identical = np.zeros(len(rows), dtype=bool)
    identical[done] = [known.identical[sha] for sha in reused]
    largest = max((known.difference[sha] for sha in reused), default=0.0)
    labels = tuple(fp32.labels)
    for chunk in _chunks(rows[~done]):
        pixels = dataset.load_examples(store, chunk, fp32.spec)
        a, b = predict_all(fp32, pixels), predict_all(int8, pixels)
        answers = _answers(fp32, a)
        same = [x == y for x, y in zip(answers, _answers(int8, b), strict=True)]
        identical[chunk.index.to_numpy()] = same
        shown = [answer != fp32.policy.unknown for answer in answers]
        diffs = shown_differences(
            probability_matrix(a, labels), probability_matrix(b, labels), shown
        )
        largest = max(largest, float(diffs.max(initial=0.0)))
    parts = {
        part: (int(mask.sum()), int(identical[mask].sum()))
        for part in PARTS
        if (mask := (rows["part"] == part).to_numpy()).any()
    }
    return Agreement(len(rows), int(identical.sum()), largest, parts)
