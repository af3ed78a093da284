"""Drift monitoring: compare served images' statistics with the training reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from dandelion_lib.features import STAT_COLUMNS

REFERENCE_BINS = 10


def build_reference(stats: Any, columns: tuple[str, ...] = STAT_COLUMNS) -> dict[str, Any]:
    """Summarise per-image statistics (a DataFrame or a mapping of column -> values).

    Returns a JSON-able reference: per feature, quantile bin edges and the share of
    reference images in each bin (the basis of PSI), plus mean and std.
    """
    ref: dict[str, Any] = {"bins": REFERENCE_BINS, "features": {}}
    for col in columns:
        values = np.asarray(stats[col], dtype=np.float64)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, REFERENCE_BINS + 1)))
        counts, _ = np.histogram(values, bins=_open_edges(edges))
        ref["features"][col] = {
            "edges": edges.tolist(),
            "proportions": (counts / max(len(values), 1)).tolist(),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "count": len(values),
        }
    return ref


def _open_edges(edges: np.ndarray) -> np.ndarray:
    inner = edges[1:-1] if len(edges) > 2 else edges[:0]
    return np.concatenate([[-np.inf], inner, [np.inf]])


PSI_DRIFT_THRESHOLD = 0.2
"""PSI above this means a feature has drifted (0.1-0.2 is a moderate shift)."""


def psi(reference: dict[str, Any], values: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of ``values`` against one feature's reference bins."""
    if len(values) == 0:
        return 0.0
    edges = _open_edges(np.asarray(reference["edges"], dtype=np.float64))
    expected = np.asarray(reference["proportions"], dtype=np.float64)
    counts, _ = np.histogram(values, bins=edges)
    actual = counts / len(values)
    expected = np.clip(expected, eps, None)
    actual = np.clip(actual, eps, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class DriftMonitor:
    """A sliding window of served images' statistics, scored against a reference.

    Thread-safe enough for one writer per call (the API calls ``add`` from its
    inference worker); ``scores`` copies the window before computing.
    """

    def __init__(self, reference: dict[str, Any], window: int = 200):
        from collections import deque

        self.reference = reference.get("features", {}) if reference else {}
        self.window: deque[dict[str, float]] = deque(maxlen=window)

    def add(self, stats: dict[str, float]) -> None:
        self.window.append(stats)

    def __len__(self) -> int:
        return len(self.window)

    def scores(self) -> dict[str, float]:
        """PSI per feature over the current window (empty when no reference)."""
        rows = list(self.window)
        return {
            name: psi(ref, np.asarray([r[name] for r in rows if name in r], dtype=np.float64))
            for name, ref in self.reference.items()
        }

    def drifted_share(self, threshold: float = PSI_DRIFT_THRESHOLD) -> float:
        scores = self.scores()
        return sum(s > threshold for s in scores.values()) / len(scores) if scores else 0.0
