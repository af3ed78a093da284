"""What one training run reads: a dataset version resolved for training (its manifest, the
(sub)set of each split, the negatives) and the model inputs of every split.

Images go from store bytes to model inputs through
:func:`dandelion_lib.data.dataset.load_examples`, the same path the
:class:`~dandelion_lib.serving.predict.Predictor` uses when serving. A split's model inputs
are :class:`StoredPixels`: read from the store only for the rows a slice asks for, so no
stage holds every image of a split in memory (its peak does not grow with the dataset).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

CHUNK = 256
"""Images read from the store at a time when a stage walks a whole split (a multiple of the
32-image batches of extraction and scoring, so batches are the same as on one array)."""


class StoredPixels:
    """The model inputs of manifest ``rows``, read from the store when sliced.

    ``pixels[i]`` is one image ``(size, size, 3)``; a slice, a list of positions or a boolean
    mask gives the ``uint8`` array ``(n, size, size, 3)`` of those rows, loaded then
    (:func:`~dandelion_lib.data.dataset.load_examples`), ``float32`` with ``dtype``.
    :meth:`take` selects rows without reading them and :meth:`chunks` walks them
    :data:`CHUNK` at a time. Nothing is kept between reads.
    """

    def __init__(
        self, store: Any, rows: pd.DataFrame, spec: FeatureSpec, dtype: Any = np.uint8
    ) -> None:
        self.store = store
        self.rows = rows.reset_index(drop=True)
        self.spec = spec
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        size = self.spec.image_size
        return (len(self.rows), size, size, 3)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return np.asarray(self[[int(index)]][0])
        picked = load_examples(self.store, self.rows.iloc[index], self.spec)
        return picked if self.dtype == np.uint8 else picked.astype(self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every image at once: only for inputs known to be small."""
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def take(self, index: Any) -> StoredPixels:
        """The rows at ``index`` (a slice, positions or a boolean mask), still unread."""
        return StoredPixels(self.store, self.rows.iloc[index], self.spec, self.dtype)

    def as_float32(self) -> StoredPixels:
        return StoredPixels(self.store, self.rows, self.spec, np.float32)

    def chunks(self, positions: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """The images at ``positions`` (default: all), :data:`CHUNK` at a time, in order."""
        order = list(range(len(self))) if positions is None else list(positions)
        for start in range(0, len(order), CHUNK):
            yield self[order[start : start + CHUNK]]


Pixels = np.ndarray | StoredPixels
"""Model inputs: an array in memory, or rows of the store read when sliced."""


@dataclass
class TrainingData:
    """A dataset version resolved for training: its manifest, splits and model inputs."""

    version: str
    manifest: pd.DataFrame
    spec: FeatureSpec
    splits: dict[str, pd.DataFrame]
    negatives: dict[str, pd.DataFrame] = field(default_factory=dict)
    """The ``negatives`` source's rows (label ``unknown``) per split (train, test)."""
    pixels: dict[str, StoredPixels] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)
    negative_pixels: dict[str, StoredPixels] = field(default_factory=dict)
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
    """Step 2: every split's model inputs (:class:`StoredPixels`, read through the serving
    path when a step walks them) and class indices."""
    labels = data.labels
    data.pixels = {s: StoredPixels(store, rows, data.spec) for s, rows in data.splits.items()}
    data.y = {
        s: np.asarray([labels.index(v) for v in rows["label"]]) for s, rows in data.splits.items()
    }
    data.negative_pixels = {
        s: StoredPixels(store, rows, data.spec) for s, rows in data.negatives.items()
    }
