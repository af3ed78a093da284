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
