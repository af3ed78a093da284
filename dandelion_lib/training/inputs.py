"""What one training run reads: a dataset version resolved for training (its manifest, the
(sub)set of each split, the negatives) and the model inputs of every split.

Images go from store bytes to model inputs through
:func:`dandelion_lib.data.dataset.load_examples`, the same path the
:class:`~dandelion_lib.serving.predict.Predictor` uses when serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.data import dataset
from dandelion_lib.data.dataset import load_examples
from dandelion_lib.data.sources import FEEDBACK_ORIGIN
from dandelion_lib.training.config import TrainConfig, TrainingError


@dataclass
class TrainingData:
    """A dataset version resolved for training: its manifest, splits and model inputs."""

    version: str
    manifest: pd.DataFrame
    spec: FeatureSpec
    splits: dict[str, pd.DataFrame]
    negatives: dict[str, pd.DataFrame] = field(default_factory=dict)
    """The ``negatives`` source's rows (label ``unknown``) per split (train, test)."""
    pixels: dict[str, np.ndarray] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)
    negative_pixels: dict[str, np.ndarray] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    """Unaugmented backbone features per split, when the backbone stayed frozen."""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def source_count(self) -> int:
        """How many labelled sources (origins) the train split holds; accepted feedback, a
        handful of photos, does not count as one."""
        rows = self.splits.get("train")
        if rows is None or "origin" not in rows:
            return 1
        origins = set(rows["origin"]) - {FEEDBACK_ORIGIN}
        return max(len(origins), 1)

    def negative_kinds(self, split: str) -> list[str]:
        rows = self.negatives.get(split)
        return [] if rows is None else [dataset.negative_kind(s) for s in rows["source"]]


def _subset(manifest: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """Deterministic subset: at most ``limit`` images per (split, label), by sha256 order."""
    frame = manifest.sort_values("sha256")
    if limit is None:
        return frame.reset_index(drop=True)
    return frame.groupby(["split", "label"], sort=False).head(limit).reset_index(drop=True)


def load_data(config: TrainConfig, settings: Settings, store: Any) -> TrainingData:
    """Step 1: resolve the dataset version, check its labels, take the (sub)set per split."""
    version = config.dataset_version or dataset.latest_version(store)
    manifest = dataset.load_manifest(store, version)
    labels = tuple(settings.labels)
    spec = FeatureSpec(labels=labels, image_size=config.image_size)
    unknown = sorted(set(manifest["label"]) - set(labels) - {UNKNOWN})
    if unknown:
        raise TrainingError(f"dataset {version} has labels {unknown} outside {list(labels)}")
    data = _subset(manifest, config.max_images_per_class)
    negative = dataset.is_negative(data)
    data, neg = data[~negative], data[negative]
    splits = {s: data[data["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    for s, rows in splits.items():
        if rows["label"].nunique() < len(labels):
            raise TrainingError(f"dataset {version}: the {s} split lacks a class")
    negatives = {s: neg[neg["split"] == s].reset_index(drop=True) for s in ("train", "test")}
    return TrainingData(version, manifest, spec, splits, negatives)


def load_pixels(data: TrainingData, store: Any) -> None:
    """Step 2: every split's model inputs and class indices, through the serving path."""
    labels = data.labels
    data.pixels = {s: load_examples(store, rows, data.spec) for s, rows in data.splits.items()}
    data.y = {
        s: np.asarray([labels.index(v) for v in rows["label"]]) for s, rows in data.splits.items()
    }
    data.negative_pixels = {
        s: load_examples(store, rows, data.spec) for s, rows in data.negatives.items()
    }
