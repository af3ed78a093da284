"""Open-set answers: tell photos that are neither a dandelion nor grass from in-domain ones.

A two-class model answers every photo with one of its two classes. The out-of-domain (OOD)
detector here scores how far a photo's backbone features lie from the training photos'
features; a photo scoring above a threshold calibrated on in-domain validation photos is
answered ``unknown``. Everything is numpy only (no TensorFlow), so the detector loads and
scores wherever the model's features are available.

* :class:`OpenSetDetector` is the detector: ``fit`` on training features, ``score``
  (higher = more out-of-domain), ``calibrate`` a threshold for an in-domain retention,
  ``to_arrays``/``from_arrays`` (an ``.npz`` artifact, see :meth:`OpenSetDetector.save`)
  and ``to_dict``/``from_dict`` for the small JSON parameters alone.
* :func:`ood_metrics` computes the figures evaluation logs: ROC AUC in-domain vs
  out-of-domain, the share of out-of-domain photos rejected (overall and per group), the
  share of in-domain photos wrongly rejected and the accuracy on the in-domain photos
  answered.

Methods (``method``):

``knn``
    Mean cosine distance to the ``k`` nearest training embeddings. Features are centred on
    the training mean and L2-normalised first (cosine on raw, non-negative pooled
    activations compresses every photo into a narrow cone).
``mahalanobis``
    Class-conditional Mahalanobis distance: the smallest over the classes, with one shared
    covariance estimated with shrinkage towards a scaled identity (the 1600-d covariance of
    a few hundred photos is singular without it).
``knn_ratio``
    Uses negatives (out-of-domain examples): the ``knn`` distance to the in-domain
    embeddings minus the ``knn`` distance to the negatives' embeddings, so a photo that is
    closer to a known kind of non-photo than to any training photo scores high.
``logistic``
    Uses negatives: an explicit "other" class. A class-balanced, L2-regularised logistic
    regression of in-domain (all training classes together) against negatives, on
    standardised features; the score is the logit of "other".

Calibration is split-conformal: with ``n`` validation scores the threshold is the
``ceil(retention * (n + 1))``-th smallest, so a new in-domain photo exchangeable with the
validation photos is kept with probability ``>= retention`` (not just the validation photos
themselves, which with 60 photos would leave the expected false-``unknown`` share above
``1 - retention``). The validation photos are those of every labelled source together.

The guarantee holds only for photos like the validation photos, and ``logistic`` partly
learns the sources' style. So its threshold is never below a **floor** on the "other" logit
(:func:`score_floor`), higher with one labelled source, where "unlike the training photos"
mostly means "another photographer" (docs/open-set.md: leave-one-source-out figures).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from dandelion_lib.core.errors import DandelionError

OPENSET_SCHEMA_VERSION = "1"
DEFAULT_RETENTION = 0.97
"""Share of in-domain validation photos the calibrated threshold keeps (answers)."""
SCORE_FLOOR, SCORE_FLOOR_ONE_SOURCE = 1.0, 3.0
"""Lowest ``logistic`` thresholds ("other" logits: odds 2.7:1 and 20:1) with 2+ sources, 1 source."""
UNKNOWN_LABEL = "unknown"
ARTIFACT_NAME = "openset.npz"
"""File name of the detector inside the MLflow model's artifacts."""

Method = Literal["knn", "mahalanobis", "knn_ratio", "logistic"]
METHODS: tuple[str, ...] = ("knn", "mahalanobis", "knn_ratio", "logistic")
NEGATIVE_METHODS: tuple[str, ...] = ("knn_ratio", "logistic")
"""Methods fitted with negatives (out-of-domain examples)."""


class OpenSetError(DandelionError):
    """The detector cannot be fitted, calibrated or loaded from the given data."""


# --------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------


def score_floor(method: str, sources: int) -> float | None:
    """The lowest threshold of ``method`` fitted on ``sources`` labelled sources (None: no
    floor; only ``logistic`` scores are logits with a meaning independent of the data)."""
    if method != "logistic":
        return None
    return SCORE_FLOOR if sources >= 2 else SCORE_FLOOR_ONE_SOURCE


def threshold_for_retention(
    in_domain_scores: Any, retention: float, *, conformal: bool = True
) -> float:
    """The threshold keeping ``retention`` of in-domain photos (score ``<= t`` is kept).

    ``conformal`` (the default): the ``ceil(retention * (n + 1))``-th smallest of the ``n``
    scores (the largest when that exceeds ``n``), so a new photo from the same distribution
    is kept with probability ``>= retention``. Otherwise the smallest score with a share
    ``>= retention`` of the given scores at or below it.
    """
    if not 0.0 < retention <= 1.0:
        raise OpenSetError(f"retention must be in (0, 1], got {retention}")
    scores = np.sort(np.asarray(in_domain_scores, dtype=np.float64).ravel())
    if len(scores) == 0:
        raise OpenSetError("no in-domain scores to calibrate on")
    n = len(scores) + 1 if conformal else len(scores)
    keep = int(np.ceil(retention * n - 1e-9))
    return float(scores[min(max(keep, 1), len(scores)) - 1])


def _fit_logistic(
    x: np.ndarray, target: np.ndarray, l2: float, iterations: int = 500
) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression by Nesterov-accelerated gradient descent
    (deterministic; the loss is smooth and strongly convex, so it converges)."""
    n, d = x.shape
    pos = target.mean()
    if pos in (0.0, 1.0):
        raise OpenSetError("the logistic method needs both in-domain photos and negatives")
    weights = np.where(target == 1, 0.5 / pos, 0.5 / (1 - pos)) / n
    lipschitz = 0.25 * float(np.linalg.norm(x, 2)) ** 2 * weights.max() + l2
    step = 1.0 / lipschitz
    w, b = np.zeros(d), 0.0
    vw, vb = w.copy(), b
    t = 1.0
    for _ in range(iterations):
        z = x @ vw + vb
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        g = weights * (p - target)
        w_next = vw - step * (x.T @ g + l2 * vw)
        b_next = vb - step * float(g.sum())
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        vw = w_next + (t - 1.0) / t_next * (w_next - w)
        vb = b_next + (t - 1.0) / t_next * (b_next - b)
        w, b, t = w_next, b_next, t_next
    return w, b


def _as_2d(features: Any, name: str, dim: int | None = None) -> npt.NDArray[np.float32]:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise OpenSetError(f"{name} must be a non-empty 2-d array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise OpenSetError(f"{name} have {x.shape[1]} features; the detector expects {dim}")
    if not np.all(np.isfinite(x)):
        raise OpenSetError(f"{name} contain NaN or infinite values")
    return x


def _normalise(x: np.ndarray, mean: np.ndarray) -> npt.NDArray[np.float32]:
    z = x - mean
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return cast("npt.NDArray[np.float32]", (z / np.maximum(norms, 1e-12)).astype(np.float32))


def _knn_distance(
    queries: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False
) -> npt.NDArray[np.float64]:
    """Mean cosine distance of each (normalised) query to its ``k`` nearest references."""
    sims = queries @ reference.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, reference.shape[0] - int(exclude_self))
    top = -np.partition(-sims, k - 1, axis=1)[:, :k]
    return cast("npt.NDArray[np.float64]", (1.0 - top.astype(np.float64)).mean(axis=1))


@dataclass
class OpenSetDetector:
    """Out-of-domain score on backbone features; ``score > threshold`` means ``unknown``."""

    method: Method = "logistic"
    """The default is the method chosen by ``nox -s bench -- open_set`` (docs/open-set.md)."""
    k: int = 5
    """Neighbours averaged (``knn``, ``knn_ratio``)."""
    shrinkage: float = 0.5
    """Covariance shrinkage towards a scaled identity (``mahalanobis``), in [0, 1]."""
    l2: float = 0.1
    """L2 penalty of the ``logistic`` method (on standardised features)."""
    threshold: float | None = None
    retention: float | None = None
    """The in-domain retention the threshold was calibrated for."""
    calibration_size: int = 0
    floor: float | None = None
    """The lowest threshold :meth:`calibrate` may set (None: the conformal one as is)."""
    mean: np.ndarray | None = field(default=None, repr=False)
    reference: np.ndarray | None = field(default=None, repr=False)
    """Normalised in-domain training embeddings (``knn``, ``knn_ratio``)."""
    negatives: np.ndarray | None = field(default=None, repr=False)
    """Normalised negative embeddings (``knn_ratio``)."""
    class_means: np.ndarray | None = field(default=None, repr=False)
    precision: np.ndarray | None = field(default=None, repr=False)
    """Inverse of the shrunk shared covariance (``mahalanobis``)."""
    scale: np.ndarray | None = field(default=None, repr=False)
    """Per-feature standard deviation of the fit data (``logistic``)."""
    coef: np.ndarray | None = field(default=None, repr=False)
    """Weights then intercept of the "other" logit on standardised features (``logistic``)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OpenSetError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.k < 1:
            raise OpenSetError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise OpenSetError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.l2 <= 0.0:
            raise OpenSetError(f"l2 must be > 0, got {self.l2}")

    # -- fitting -------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def fit(
        self,
        train_features: Any,
        labels: Any,
        *,
        negatives: Any = None,
    ) -> OpenSetDetector:
        """Fit on in-domain training features ``(N, D)`` with integer/str ``labels`` ``(N,)``.

        ``negatives`` (out-of-domain features ``(M, D)``) are required by ``knn_ratio`` and
        ``logistic`` and ignored by the other methods. Resets any calibrated threshold.
        """
        x = _as_2d(train_features, "train_features")
        y = np.asarray(labels)
        if y.shape != (x.shape[0],):
            raise OpenSetError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
        self.threshold, self.retention, self.calibration_size = None, None, 0
        self.floor = None
        self.mean = x.mean(axis=0).astype(np.float32)
        self.reference = self.negatives = self.class_means = self.precision = None
        self.scale = self.coef = None
        neg = None
        if self.method in NEGATIVE_METHODS:
            if negatives is None:
                raise OpenSetError(f"method {self.method!r} needs negatives")
            neg = _as_2d(negatives, "negatives", x.shape[1])
        if self.method in ("knn", "knn_ratio"):
            self.reference = _normalise(x, self.mean)
        if self.method == "knn_ratio":
            assert neg is not None
            self.negatives = _normalise(neg, self.mean)
        if self.method == "logistic":
            assert neg is not None
            both = np.concatenate([x, neg]).astype(np.float64)
            self.mean = both.mean(axis=0).astype(np.float32)
            self.scale = np.maximum(both.std(axis=0), 1e-6).astype(np.float32)
            z = (both - self.mean) / self.scale
            target = np.concatenate([np.zeros(len(x)), np.ones(len(neg))])
            w, b = _fit_logistic(z, target, self.l2)
            self.coef = np.append(w, b).astype(np.float32)
        if self.method == "mahalanobis":
            classes = np.unique(y)
            means = np.stack([x[y == c].mean(axis=0) for c in classes]).astype(np.float64)
            centred = x.astype(np.float64) - means[np.searchsorted(classes, y)]
            cov = centred.T @ centred / max(len(x) - len(classes), 1)
            scale = float(np.trace(cov)) / cov.shape[0]
            shrunk = (1.0 - self.shrinkage) * cov + self.shrinkage * scale * np.eye(cov.shape[0])
            self.class_means = means.astype(np.float32)
            self.precision = np.linalg.inv(shrunk).astype(np.float32)
        return self

    # -- scoring -------------------------------------------------------------------------

    def score(self, features: Any) -> npt.NDArray[np.float64]:
        """Out-of-domain score per row of ``features`` ``(N, D)``; higher = more out-of-domain."""
        if self.mean is None:
            raise OpenSetError("the detector is not fitted")
        x = _as_2d(features, "features", self.dim)
        if self.method == "mahalanobis":
            assert self.class_means is not None and self.precision is not None
            dists = []
            for mu in self.class_means.astype(np.float64):
                d = x.astype(np.float64) - mu
                dists.append(np.einsum("ij,jk,ik->i", d, self.precision.astype(np.float64), d))
            # square root of a squared distance, scaled per dimension for readable values
            return cast(
                "npt.NDArray[np.float64]",
                np.sqrt(np.maximum(np.min(dists, axis=0), 0.0) / x.shape[1]),
            )
        if self.method == "logistic":
            assert self.scale is not None and self.coef is not None
            z = (x.astype(np.float64) - self.mean) / self.scale
            return cast(
                "npt.NDArray[np.float64]",
                z @ self.coef[:-1].astype(np.float64) + float(self.coef[-1]),
            )
        assert self.reference is not None
        q = _normalise(x, self.mean)
        near = _knn_distance(q, self.reference, self.k)
        if self.method == "knn_ratio":
            assert self.negatives is not None
            return near - _knn_distance(q, self.negatives, self.k)
        return near

    def calibrate(
        self, val_features: Any, retention: float = DEFAULT_RETENTION, floor: float | None = None
    ) -> float:
        """Set and return the threshold for an in-domain ``retention`` (see
        :func:`threshold_for_retention`, conformal): at least ``retention`` of
        ``val_features`` score at or below it, and a new in-domain photo does with
        probability ``>= retention``; never below ``floor`` (see :func:`score_floor`).
        Photos scoring above it are answered ``unknown``. Calibrate on in-domain photos the
        detector was not fitted on.
        """
        scores = self.score(val_features)
        self.floor = floor
        conformal = threshold_for_retention(scores, retention)
        self.threshold = conformal if floor is None else max(conformal, float(floor))
        self.retention = float(retention)
        self.calibration_size = len(scores)
        return self.threshold

    def is_unknown(self, features: Any) -> npt.NDArray[np.bool_]:
        """Boolean per row: the photo is out of domain (score above the threshold)."""
        if self.threshold is None:
            raise OpenSetError("the detector has no threshold; call calibrate first")
        return self.score(features) > self.threshold

    # -- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able parameters (method, k, threshold, ...), without the arrays."""
        return {
            "schema_version": OPENSET_SCHEMA_VERSION,
            "method": self.method,
            "k": self.k,
            "shrinkage": self.shrinkage,
            "l2": self.l2,
            "threshold": self.threshold,
            "retention": self.retention,
            "calibration_size": self.calibration_size,
            "floor": self.floor,
            "dim": self.dim,
        }

    _ARRAYS = ("mean", "reference", "negatives", "class_means", "precision", "scale", "coef")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter as arrays (``params`` holds :meth:`to_dict` as JSON)."""
        out = {"params": np.asarray(json.dumps(self.to_dict()))}
        for name in self._ARRAYS:
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value, dtype=np.float32)
        return out

    @classmethod
    def from_dict(
        cls, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
    ) -> OpenSetDetector:
        """Rebuild from :meth:`to_dict` (and the arrays of :meth:`to_arrays` to score)."""
        version = str(params.get("schema_version", ""))
        if version != OPENSET_SCHEMA_VERSION:
            raise OpenSetError(
                f"open-set detector schema {version!r} is not supported "
                f"(expected {OPENSET_SCHEMA_VERSION!r})"
            )
        det = cls(
            method=params["method"],
            k=int(params["k"]),
            shrinkage=float(params["shrinkage"]),
            l2=float(params.get("l2", 0.1)),
        )
        det.threshold = None if params.get("threshold") is None else float(params["threshold"])
        det.retention = None if params.get("retention") is None else float(params["retention"])
        det.calibration_size = int(params.get("calibration_size") or 0)
        det.floor = None if params.get("floor") is None else float(params["floor"])
        for name in cls._ARRAYS:
            if arrays is not None and name in arrays:
                setattr(det, name, np.asarray(arrays[name], dtype=np.float32))
        if arrays is not None:
            det._check_arrays(params.get("dim"))
        return det

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> OpenSetDetector:
        if "params" not in arrays:
            raise OpenSetError("not an open-set detector artifact (no 'params')")
        return cls.from_dict(json.loads(str(arrays["params"])), arrays)

    def _check_arrays(self, dim: Any) -> None:
        needed = {
            "knn": ("mean", "reference"),
            "knn_ratio": ("mean", "reference", "negatives"),
            "mahalanobis": ("mean", "class_means", "precision"),
            "logistic": ("mean", "scale", "coef"),
        }[self.method]
        missing = [n for n in needed if getattr(self, n) is None]
        if missing:
            raise OpenSetError(f"open-set detector artifact lacks {', '.join(missing)}")
        if dim is not None and self.dim != int(dim):
            raise OpenSetError(f"open-set detector artifact has dim {self.dim}, expected {dim}")

    def save(self, path: str | Path) -> Path:
        """Write the detector as one compressed ``.npz`` (no pickles)."""
        path = Path(path)
        with path.open("wb") as fh:
            # savez_compressed also takes allow_pickle: bool by keyword, so mypy rejects any
            # **dict[str, ndarray] (none of these keys is named allow_pickle)
            np.savez_compressed(fh, **self.to_arrays())  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> OpenSetDetector:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise OpenSetError(f"cannot read the open-set detector at {path}: {exc}") from exc
        return cls.from_arrays(arrays)


# --------------------------------------------------------------------------------------
# Evaluation figures
# --------------------------------------------------------------------------------------


def roc_auc(negative_scores: Any, positive_scores: Any) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U)."""
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    both = np.concatenate([neg, pos])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    ranks[order] = np.arange(1, len(both) + 1)
    # average ranks of ties
    sorted_vals = both[order]
    start = 0
    for end in range(1, len(both) + 1):
        if end == len(both) or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0
            start = end
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))


def ood_metrics(
    in_scores: Any,
    ood_scores: Any,
    threshold: float,
    *,
    ood_groups: Iterable[str] | None = None,
    in_correct: Any = None,
    hard_groups: Sequence[str] = ("daisy", "sunflowers"),
) -> dict[str, float]:
    """The open-set figures evaluation logs (all shares in [0, 1]).

    ``in_scores``: scores of in-domain photos (e.g. the test split); ``ood_scores``: scores
    of out-of-domain photos, with their ``ood_groups`` (folder names) if known;
    ``in_correct``: whether the classifier's label of each in-domain photo is right.
    A photo is ``unknown`` when its score is above ``threshold``.

    Keys: ``ood_roc_auc``, ``ood_unknown_share``, ``ood_unknown_share_<group>``,
    ``ood_unknown_share_hard`` (the ``hard_groups`` together), ``in_domain_unknown_share``,
    ``answered_accuracy`` (accuracy on in-domain photos not answered ``unknown``),
    ``answered_share``, ``in_domain_count``, ``ood_count``.
    """
    ins = np.asarray(in_scores, dtype=np.float64).ravel()
    outs = np.asarray(ood_scores, dtype=np.float64).ravel()
    in_unknown = ins > threshold
    out_unknown = outs > threshold
    m: dict[str, float] = {
        "ood_roc_auc": roc_auc(ins, outs),
        "ood_unknown_share": float(out_unknown.mean()) if len(outs) else float("nan"),
        "in_domain_unknown_share": float(in_unknown.mean()) if len(ins) else float("nan"),
        "answered_share": float((~in_unknown).mean()) if len(ins) else float("nan"),
        "in_domain_count": float(len(ins)),
        "ood_count": float(len(outs)),
    }
    if ood_groups is not None:
        groups = np.asarray(list(ood_groups))
        if groups.shape != outs.shape:
            raise OpenSetError("ood_groups must have one entry per out-of-domain score")
        for g in sorted(set(groups.tolist())):
            m[f"ood_unknown_share_{g}"] = float(out_unknown[groups == g].mean())
        hard = np.isin(groups, list(hard_groups))
        if hard.any():
            m["ood_unknown_share_hard"] = float(out_unknown[hard].mean())
    if in_correct is not None:
        correct = np.asarray(in_correct, dtype=bool).ravel()
        if correct.shape != ins.shape:
            raise OpenSetError("in_correct must have one entry per in-domain score")
        answered = ~in_unknown
        m["answered_accuracy"] = float(correct[answered].mean()) if answered.any() else float("nan")
        m["accuracy_all"] = float(correct.mean()) if len(correct) else float("nan")
    return m
