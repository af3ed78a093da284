"""INT8 answers rechecked in FP32 near a decision boundary.

INT8 moves a photo's open-set score by up to about one logit and its confidence by a few
points (docs/model.md, "INT8 rechecked near a boundary"). Far from the two boundaries of an
answer (the open-set threshold and the confidence threshold) that never changes the answer;
near them it can. :class:`Recheck` runs the photos INT8 puts within a margin of either
boundary through the FP32 session of the same model version and keeps FP32's outputs for them,
so the answers users get are FP32's while most photos pay INT8's cost only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Outputs = tuple[Any, npt.NDArray[Any], list[Any], "npt.NDArray[np.float64] | None"]
"""One forward pass's features (or None), probabilities, feature maps (empty unless an
explanation is asked for) and open-set scores (None without a detector)."""


@dataclass
class Recheck:
    """The FP32 session of the served INT8 model and the two margins around the boundaries."""

    forward: Any
    """FP32 :class:`~dandelion_lib.serving.runtime.OnnxForward` of the same model version."""
    ood_margin: float
    """Open-set scores within this of the threshold are rechecked (logits)."""
    confidence_margin: float
    """Confidences within this of the confidence threshold are rechecked."""
    rechecked: int = 0
    """Photos rechecked so far (what the recheck costs: each is one more FP32 pass)."""

    def rows(
        self,
        probs: npt.NDArray[Any],
        scores: npt.NDArray[np.float64] | None,
        ood_threshold: float | None,
        confidence_threshold: float,
    ) -> npt.NDArray[np.intp]:
        """Indices of the photos near a boundary."""
        near = np.abs(probs.max(axis=1) - confidence_threshold) < self.confidence_margin
        if scores is not None and ood_threshold is not None:
            near |= np.abs(scores - ood_threshold) < self.ood_margin
        return np.flatnonzero(near)

    def apply(
        self,
        batch: npt.NDArray[Any],
        outputs: Outputs,
        score: Callable[[Any], npt.NDArray[np.float64]] | None,
        ood_threshold: float | None,
        confidence_threshold: float,
    ) -> Outputs:
        """``outputs`` (features, probabilities, feature maps and open-set scores: INT8's)
        with FP32's rows for the photos near a boundary; ``score`` maps features to open-set
        scores (only the rechecked photos are scored again)."""
        features, probs, maps, scores = outputs
        idx = self.rows(probs, scores, ood_threshold, confidence_threshold)
        if not len(idx):
            return outputs
        self.rechecked += len(idx)
        x = np.ascontiguousarray(batch[idx], dtype=np.float32)
        if maps:
            f32_features, f32_probs, f32_maps = self.forward.with_maps(x)
        else:
            (f32_features, f32_probs), f32_maps = self.forward(x), []
        probs = probs.copy()
        probs[idx] = np.asarray(f32_probs)
        if features is not None and f32_features is not None:
            features = np.array(features, copy=True)
            features[idx] = f32_features
        merged = []
        for full, part in zip(maps, f32_maps, strict=True):
            full = np.array(full, copy=True)
            full[idx] = part
            merged.append(full)
        if scores is not None and score is not None and f32_features is not None:
            scores = scores.copy()
            scores[idx] = score(f32_features)
        return features, probs, merged, scores
