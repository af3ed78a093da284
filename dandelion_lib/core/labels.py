"""The labels: training labels (in class-index order) and the answers that are never
training labels (``uncertain``, ``unknown``), plus the feedback label ``neither``."""

from __future__ import annotations

DEFAULT_LABELS: tuple[str, ...] = ("dandelion", "grass")
"""Training labels, in class-index order (the default of ``DANDELION_LABELS``)."""

UNCERTAIN = "uncertain"
"""Answer given below the confidence threshold; never a training label."""

UNKNOWN = "unknown"
"""Answer for a photo that is neither class (out of domain); never a training label. It is
also the manifest label of the ``negatives`` source: out-of-domain photos the open-set
detector is fitted on."""

NEITHER = "neither"
"""Feedback label: the photo shows neither class (after review, a negative example)."""
