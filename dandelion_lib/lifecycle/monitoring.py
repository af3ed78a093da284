"""Drift monitoring: compare new images' statistics with the model's training reference.

The reference (:func:`build_reference`) summarises the per-image statistics of the training
split (:data:`dandelion_lib.core.features.STAT_COLUMNS`) and is logged with every model. Two
scores compare a batch with it, per feature:

* **PSI** (population stability index) over the reference's ten quantile bins: *how much*
  the distribution moved. Conventionally 0.1-0.2 is a moderate shift, above 0.2 a real one.
* **KS** (Kolmogorov-Smirnov statistic and p-value, against the reference's quantiles):
  *whether* the move is more than chance.

A feature counts as drifted when its PSI is above the threshold (0.2 by default) **and**
above what sampling noise alone produces for a window of that size (the 99.9 % quantile of
PSI under no drift, ``chi2(bins - 1) * (1/n + 1/n_ref)``), so small windows do not raise
false alarms. The share of drifted features is the batch's drift score; at or above
``drift_share_threshold`` (0.5) the verdict is *drift*.

The same code runs live in the API (:class:`DriftMonitor`, a sliding window of served
images exported as Prometheus gauges) and offline
(:func:`dandelion_lib.lifecycle.drift.drift_report`, the ``dandelion drift`` command and
``notebooks/04_drift.ipynb``) to check a folder of new photos before serving them.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Literal

import numpy as np

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import STAT_COLUMNS

REFERENCE_BINS = 10
REFERENCE_QUANTILES = 101
"""Quantiles stored per feature (0 %, 1 %, ..., 100 %): the reference CDF used by KS."""

PSI_DRIFT_THRESHOLD = 0.2
"""PSI above this means a feature has drifted (0.1-0.2 is a moderate shift)."""

DRIFT_SHARE_THRESHOLD = 0.5
"""Share of drifted features at or above which a batch is reported as drifted."""

NOISE_QUANTILE = 0.999
"""Quantile of PSI under no drift below which a score is treated as sampling noise."""

PSI_SMOOTHING = 0.5
"""Pseudo-count added to every bin of the batch histogram (keeps empty bins finite)."""


class DriftError(DandelionError):
    """A drift check that cannot run (no reference, no images, too few images)."""


# --- reference ---------------------------------------------------------------------------


def build_reference(stats: Any, columns: tuple[str, ...] = STAT_COLUMNS) -> dict[str, Any]:
    """Summarise per-image statistics (a DataFrame or a mapping of column -> values).

    Returns a JSON-able reference: per feature, quantile bin edges and the share of
    reference images in each bin (the basis of PSI), 101 quantiles (the basis of KS),
    mean, std and count.
    """
    ref: dict[str, Any] = {"bins": REFERENCE_BINS, "features": {}}
    for col in columns:
        values = np.asarray(stats[col], dtype=np.float64)
        if len(values) == 0:
            raise DriftError(f"cannot build a drift reference: no values for {col!r}")
        edges = np.unique(np.quantile(values, np.linspace(0, 1, REFERENCE_BINS + 1)))
        counts, _ = np.histogram(values, bins=open_edges(edges))
        ref["features"][col] = {
            "edges": edges.tolist(),
            "proportions": (counts / len(values)).tolist(),
            "quantiles": np.quantile(values, np.linspace(0, 1, REFERENCE_QUANTILES)).tolist(),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "count": len(values),
        }
    return ref


def open_edges(edges: np.ndarray) -> np.ndarray:
    """Bin edges open at both ends (the reference's outer edges become -inf and inf)."""
    inner = edges[1:-1] if len(edges) > 2 else edges[:0]
    return np.concatenate([[-np.inf], inner, [np.inf]])


def load_reference(model_uri: str) -> dict[str, Any]:
    """The drift reference logged with a model (reads only its MLmodel file, not the weights)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        meta = mlflow.models.get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DriftError(f"cannot read model {model_uri}: {first}") from exc
    reference: dict[str, Any] = meta.get("drift_reference") or {}
    if not reference.get("features"):
        raise DriftError(f"model {model_uri} was logged without a drift reference")
    return reference


# --- scores ------------------------------------------------------------------------------


def psi(reference: dict[str, Any], values: np.ndarray, smoothing: float = PSI_SMOOTHING) -> float:
    """Population stability index of ``values`` against one feature's reference bins.

    The batch histogram gets ``smoothing`` pseudo-counts per bin, so a bin that happens to
    be empty in a small batch adds a bounded amount instead of an arbitrarily large one.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return 0.0
    edges = open_edges(np.asarray(reference["edges"], dtype=np.float64))
    expected = np.asarray(reference["proportions"], dtype=np.float64)
    counts, _ = np.histogram(values, bins=edges)
    actual = (counts + smoothing) / (len(values) + smoothing * len(counts))
    expected = np.clip(expected, 1e-4, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_noise_floor(n: int, n_reference: int, bins: int = REFERENCE_BINS) -> float:
    """PSI that sampling noise alone exceeds with probability ``1 - NOISE_QUANTILE``.

    Under no drift, PSI is approximately ``chi2(bins - 1) * (1/n + 1/n_reference)``.
    """
    from scipy.stats import chi2

    if n <= 0:
        return math.inf
    inv_ref = 1.0 / n_reference if n_reference > 0 else 0.0
    return float(chi2.ppf(NOISE_QUANTILE, max(bins - 1, 1)) * (1.0 / n + inv_ref))


def ks(reference: dict[str, Any], values: np.ndarray) -> tuple[float, float] | None:
    """Kolmogorov-Smirnov statistic and p-value of ``values`` against the reference.

    The reference CDF is interpolated linearly between its stored quantiles (repeated
    quantiles, e.g. sharpness clipped at 1.0, become a jump). The p-value uses the
    effective sample size ``n * n_ref / (n + n_ref)`` of the two-sample test; with ties it
    is conservative. None when the reference has no quantiles or the batch is empty.
    """
    quantiles = reference.get("quantiles")
    values = np.sort(np.asarray(values, dtype=np.float64))
    if not quantiles or len(values) == 0:
        return None
    from scipy.stats import kstwo

    q = np.asarray(quantiles, dtype=np.float64)
    probs = np.linspace(0.0, 1.0, len(q))
    # |ECDF - F| is largest at a breakpoint of either function: check both one-sided limits.
    points = np.union1d(values, q)
    n = len(values)
    ecdf_at = np.searchsorted(values, points, side="right") / n
    ecdf_below = np.searchsorted(values, points, side="left") / n
    stat = float(
        max(
            np.max(np.abs(ecdf_at - _reference_cdf(points, q, probs, "right"))),
            np.max(np.abs(ecdf_below - _reference_cdf(points, q, probs, "left"))),
        )
    )
    m = int(reference.get("count") or 0)
    n_eff = n * m / (n + m) if m > 0 else n
    return stat, float(kstwo.sf(stat, max(round(n_eff), 1)))


def _reference_cdf(
    x: np.ndarray, q: np.ndarray, probs: np.ndarray, side: Literal["left", "right"]
) -> np.ndarray:
    """Piecewise-linear CDF through (q, probs): its value (``side="right"``) or its left
    limit (``side="left"``) at each x."""
    idx = np.searchsorted(q, x, side=side)
    lo = np.clip(idx - 1, 0, len(q) - 1)
    hi = np.clip(idx, 0, len(q) - 1)
    span = q[hi] - q[lo]
    frac = np.where(span > 0, (x - q[lo]) / np.where(span > 0, span, 1.0), 0.0)
    out = probs[lo] + frac * (probs[hi] - probs[lo])
    out = np.where(idx == 0, 0.0, out)
    return np.where(idx >= len(q), 1.0, out)


def drifted_features(
    scores: dict[str, float],
    reference: dict[str, Any],
    n: int,
    threshold: float = PSI_DRIFT_THRESHOLD,
) -> dict[str, bool]:
    """Per feature: PSI above ``threshold`` and above the noise floor for ``n`` images."""
    out = {}
    for name, score in scores.items():
        ref = reference.get(name, {})
        floor = psi_noise_floor(n, int(ref.get("count") or 0), len(ref.get("proportions", [])))
        out[name] = bool(score > max(threshold, floor))
    return out


class DriftMonitor:
    """A sliding window of served images' statistics, scored against a reference.

    The API calls :meth:`add` for each served image (from its inference worker) and reads
    :meth:`scores` / :meth:`drifted_share` when it refreshes its gauges; both copy the
    window under a lock, so readers and the writer can run on different threads.
    """

    def __init__(
        self,
        reference: dict[str, Any],
        window: int = 200,
        threshold: float = PSI_DRIFT_THRESHOLD,
    ):
        self.reference: dict[str, Any] = reference.get("features", {}) if reference else {}
        self.window: deque[dict[str, float]] = deque(maxlen=window)
        self.threshold = threshold
        self._lock = threading.Lock()

    def add(self, stats: dict[str, float]) -> None:
        with self._lock:
            self.window.append(stats)

    def __len__(self) -> int:
        return len(self.window)

    def _rows(self) -> list[dict[str, float]]:
        with self._lock:
            return list(self.window)

    def scores(self) -> dict[str, float]:
        """PSI per feature over the current window (empty when no reference)."""
        return feature_scores(self.reference, self._rows())

    def drifted(self, threshold: float | None = None) -> dict[str, bool]:
        """Per feature: drifted or not (see :func:`drifted_features`)."""
        return self._judge(threshold)[1]

    def drifted_share(self, threshold: float | None = None) -> float:
        """Share of features that drifted, in [0, 1] (0 when no reference or no images)."""
        return self.snapshot(threshold)[1]

    def snapshot(self, threshold: float | None = None) -> tuple[dict[str, float], float]:
        """PSI per feature and the drifted share, both from one copy of the window."""
        scores, flags = self._judge(threshold)
        return scores, (sum(flags.values()) / len(flags) if flags else 0.0)

    def _judge(self, threshold: float | None) -> tuple[dict[str, float], dict[str, bool]]:
        """PSI and drift flags per feature, from one copy of the window."""
        rows = self._rows()
        scores = feature_scores(self.reference, rows)
        flags = drifted_features(
            scores, self.reference, len(rows), self.threshold if threshold is None else threshold
        )
        return scores, flags


def feature_scores(reference: dict[str, Any], rows: list[dict[str, float]]) -> dict[str, float]:
    """PSI per feature of the reference over ``rows`` (per-image statistics)."""
    return {
        name: psi(ref, np.asarray([r[name] for r in rows if name in r], dtype=np.float64))
        for name, ref in reference.items()
    }
