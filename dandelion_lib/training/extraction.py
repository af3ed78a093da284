"""Backbone features for training: the frozen backbone's embeddings of every split, read from
the feature store where cached, and of ``augment_copies`` augmented views of every training
image (flip, rotation, zoom, brightness, contrast; each image's view depends on the image
alone, so it is cached too); and the same work ahead of training, in shards (the DAGs'
mapped ``extract_features`` tasks).

An *extractor* is any callable from a batch of float32 model inputs to features ``(N, D)``:
the backbone's graph, or :class:`dandelion_lib.lifecycle.extractor.FeatureExtractor`, which runs
it on ONNX Runtime where that is exact.
"""

from __future__ import annotations

import hashlib
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import pandas as pd
import tensorflow as tf
from keras import layers

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.core.storage import open_store
from dandelion_lib.data.featurestore import (
    FeatureStore,
    cached_embeddings,
    feature_key,
    key_inputs,
    weights_digest,
)
from dandelion_lib.training import model as model_lib
from dandelion_lib.training.config import TrainConfig
from dandelion_lib.training.inputs import CHUNK, Pixels, StoredPixels, TrainingData, load_data

AUGMENT_ALGORITHM = 1
"""Bumped when :func:`augment_views` draws or applies its transformations differently."""


def make_augmenter(config: TrainConfig) -> Any:
    """Keras preprocessing layers (pixels in [0, 255]); identity when augmentation is off."""

    seed = config.seed
    steps: list[Any] = []
    if config.augment:
        if config.flip:
            steps.append(layers.RandomFlip("horizontal", seed=seed))
        if config.rotation:
            steps.append(layers.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 1))
        if config.zoom:
            steps.append(layers.RandomZoom(config.zoom, fill_mode="reflect", seed=seed + 2))
        if config.brightness:
            steps.append(
                layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 3)
            )
        if config.contrast:
            steps.append(
                layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 4)
            )
    return keras.Sequential(steps, name="augment")


def make_dataset(
    pixels: Pixels,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    augmenter: Any = None,
    shuffle_seed: int | None = None,
    num_classes: int = 2,
) -> Any:
    """A ``tf.data`` pipeline: uint8 pixels -> float32 model inputs (optionally augmented).

    With ``labels`` it yields ``(inputs, one-hot labels)``; map calls are sequential so
    seeded augmentation is reproducible. :class:`StoredPixels` are read batch by batch: the
    pipeline shuffles and batches their positions (the same order as for an array), so
    only a batch of images is in memory at a time.
    """

    stored = isinstance(pixels, StoredPixels)
    items = np.arange(len(pixels)) if stored else pixels
    ds = tf.data.Dataset.from_tensor_slices(items if labels is None else (items, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(pixels), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def prepare(x: Any, y: Any = None) -> Any:
        if isinstance(pixels, StoredPixels):
            x = _read_batch(pixels, x)
        x = tf.cast(x, tf.float32)
        if augmenter is not None:
            x = tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0)
        return x if y is None else (x, tf.one_hot(y, num_classes))

    return ds.map(prepare).prefetch(2)


def _read_batch(pixels: StoredPixels, positions: Any) -> Any:
    """The images at the positions of a batch, read inside a ``tf.data`` pipeline."""
    batch = tf.numpy_function(lambda p: pixels[p.tolist()], [positions], tf.uint8, stateful=False)
    batch.set_shape([None, *pixels.shape[1:]])
    return batch


def _chunks(pixels: Pixels, positions: list[int]) -> Any:
    """The images at ``positions`` of ``pixels``, :data:`CHUNK` at a time (an array's rows,
    or :class:`StoredPixels` read then)."""
    for start in range(0, len(positions), CHUNK):
        yield positions[start : start + CHUNK], np.asarray(pixels[positions[start : start + CHUNK]])


def _extract(extractor: Any, dataset: Any, dim: int) -> npt.NDArray[np.float32]:
    parts = [np.asarray(extractor(batch), dtype=np.float32) for batch in dataset]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def extract_features(extractor: Any, pixels: Pixels, dim: int) -> npt.NDArray[np.float32]:
    """Backbone features of ``pixels`` (uint8 model inputs), unaugmented; images are read
    :data:`CHUNK` at a time."""
    parts = [
        _extract(extractor, make_dataset(chunk), dim)
        for _, chunk in _chunks(pixels, list(range(len(pixels))))
    ]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def open_feature_store(store: Any, spec: FeatureSpec, backbone: Any) -> FeatureStore:
    """The feature store of this spec and backbone (keyed by its name and weights)."""
    digest = weights_digest(backbone.model)
    return FeatureStore(
        store,
        feature_key(spec, backbone.name, digest),
        inputs=key_inputs(spec, backbone.name, digest),
    )


def split_features(
    extractor: Any,
    pixels: Pixels,
    shas: list[str],
    dim: int,
    fstore: FeatureStore | None,
    counts: dict[str, int],
) -> npt.NDArray[np.float32]:
    """Unaugmented backbone features of ``pixels`` (images named by ``shas``): cached ones
    read from ``fstore``, the missing ones extracted and stored; ``counts`` adds up how many
    of each (``features_cached``, ``features_computed``)."""

    def compute(positions: list[int]) -> npt.NDArray[np.float32]:
        parts = [
            _extract(extractor, make_dataset(chunk), dim) for _, chunk in _chunks(pixels, positions)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    feats, cached, computed = cached_embeddings(fstore, shas, compute)
    _tally(counts, cached, computed)
    return feats


def _tally(counts: dict[str, int], cached: int, computed: int, suffix: str = "") -> None:
    """Add to ``features_cached<suffix>`` and ``features_computed<suffix>``."""
    for kind, n in (("cached", cached), ("computed", computed)):
        counts[f"features_{kind}{suffix}"] = counts.get(f"features_{kind}{suffix}", 0) + n


def augmented_view_name(config: TrainConfig, copy: int) -> str:
    """The feature store's name of augmented view ``copy`` under ``config``'s augmentation:
    ``aug<copy>-<digest of the seed and the augmentation parameters>``."""
    params = {
        "algorithm": AUGMENT_ALGORITHM,
        "seed": config.seed,
        "copy": copy,
        **{k: getattr(config, k) for k in ("flip", "rotation", "zoom", "brightness", "contrast")},
    }
    digest = hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:12]
    return f"aug{copy}-{digest}"


def _view_transformations(
    shas: list[str], copy: int, config: TrainConfig
) -> dict[str, npt.NDArray[Any]]:
    """Each image's random transformation of view ``copy``, drawn from its own generator
    seeded by (its sha256, the seed, the view): independent of batch and order."""
    draws: dict[str, list[Any]] = {k: [] for k in ("flip", "angle", "zoom", "delta", "factor")}
    for sha in shas:
        rng = np.random.default_rng([int(sha[:16], 16), config.seed, copy])
        u = rng.uniform(-1.0, 1.0, size=5)
        draws["flip"].append(bool(config.flip) and u[0] > 0)
        draws["angle"].append(u[1] * config.rotation * 2 * np.pi)
        draws["zoom"].append(1.0 + u[2] * config.zoom)
        draws["delta"].append(u[3] * config.brightness * 255.0)
        draws["factor"].append(1.0 + u[4] * config.contrast)
    return {
        k: np.asarray(v, bool if k == "flip" else np.float32).reshape(len(shas))
        for k, v in draws.items()
    }


def augment_views(
    pixels: np.ndarray, shas: list[str], copy: int, config: TrainConfig, batch_size: int = 32
) -> Any:
    """A ``tf.data`` pipeline of augmented view ``copy`` of ``pixels`` (float32 inputs).

    Flip, rotation and zoom about the centre (reflected borders), brightness and contrast,
    as the Keras layers of :func:`make_augmenter` do, but each image's transformation
    depends only on its sha256, ``config.seed`` and ``copy``. So a view's backbone feature
    is cacheable under :func:`augmented_view_name` (a new image adds only its own views).
    """

    t = _view_transformations(shas, copy, config)
    size = float(pixels.shape[1]) if len(pixels) else 1.0
    centre = (size - 1.0) / 2.0
    cos, sin, zoom = np.cos(t["angle"]), np.sin(t["angle"]), t["zoom"]
    # output (x, y) -> input: centre + zoom * R(angle) (out - centre)
    transforms = np.stack(
        [
            zoom * cos,
            -zoom * sin,
            centre - zoom * (cos * centre - sin * centre),
            zoom * sin,
            zoom * cos,
            centre - zoom * (sin * centre + cos * centre),
            np.zeros_like(zoom),
            np.zeros_like(zoom),
        ],
        axis=1,
    ).astype(np.float32)
    params = (t["flip"], transforms, t["delta"], t["factor"])
    ds = tf.data.Dataset.from_tensor_slices((pixels, *params)).batch(batch_size)

    def prepare(x: Any, flip: Any, transform: Any, delta: Any, factor: Any) -> Any:
        x = tf.cast(x, tf.float32)
        x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
        if config.rotation or config.zoom:
            x = keras.ops.image.affine_transform(x, transform, fill_mode="reflect")
        x = tf.clip_by_value(x + delta[:, None, None, None], 0.0, 255.0)
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return tf.clip_by_value((x - mean) * factor[:, None, None, None] + mean, 0.0, 255.0)

    return ds.map(prepare).prefetch(2)


def augmented_features(
    extractor: Any,
    pixels: Pixels,
    shas: list[str],
    dim: int,
    config: TrainConfig,
    fstore: FeatureStore | None,
    counts: dict[str, int],
) -> list[npt.NDArray[np.float32]]:
    """Backbone features of ``config.augment_copies`` augmented views of ``pixels``: cached
    ones read from ``fstore`` (per view, see :func:`augmented_view_name`), the missing ones
    extracted and stored; ``counts`` adds ``features_cached_augmented`` and
    ``features_computed_augmented``."""

    if not config.augment:
        return []
    views = []
    for copy in range(config.augment_copies):

        def compute(positions: list[int], copy: int = copy) -> npt.NDArray[np.float32]:
            parts = [
                _extract(extractor, augment_views(chunk, [shas[p] for p in at], copy, config), dim)
                for at, chunk in _chunks(pixels, positions)
            ]
            return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

        feats, cached, computed = cached_embeddings(
            fstore, shas, compute, view=augmented_view_name(config, copy)
        )
        _tally(counts, cached, computed, "_augmented")
        views.append(feats)
    return views


def _add_augmented(counts: dict[str, int]) -> None:
    """``features_cached`` / ``features_computed`` count every view, augmented ones too."""
    for kind in ("cached", "computed"):
        counts[f"features_{kind}"] += counts.get(f"features_{kind}_augmented", 0)


def _shas(rows: pd.DataFrame) -> list[str]:
    return [str(v) for v in rows["sha256"]]


def embed_training_data(
    extractor: Any,
    data: TrainingData,
    config: TrainConfig,
    fstore: FeatureStore | None,
    dim: int,
) -> tuple[list[npt.NDArray[np.float32]], dict[str, int]]:
    """Step 3: the unaugmented features of every split (set as ``data.features``) and the
    augmented views of the train split, read from ``fstore`` where cached and extracted
    otherwise. Returns the views and the counts of cached and computed features."""
    counts: dict[str, int] = {}
    data.features = {
        s: split_features(extractor, p, _shas(data.splits[s]), dim, fstore, counts)
        for s, p in data.pixels.items()
    }
    train_shas = _shas(data.splits["train"])
    views = augmented_features(
        extractor, data.pixels["train"], train_shas, dim, config, fstore, counts
    )
    _add_augmented(counts)
    return views, counts


# --------------------------------------------------------------------------------------
# Extraction ahead of training, in shards (the DAGs' mapped extract_features tasks)
# --------------------------------------------------------------------------------------


def _shard_rows(data: TrainingData) -> pd.DataFrame:
    """Every image training embeds (train, val and test; negatives go through the served
    model), in sha256 order: the order shards are cut from."""
    rows = pd.concat([data.splits[s] for s in ("train", "val", "test")], ignore_index=True)
    return rows.sort_values("sha256", kind="stable").reset_index(drop=True)


def caches_features(config: TrainConfig, settings: Settings) -> bool:
    """Whether training reads the feature store: the cache is on and the backbone is a
    frozen pretrained one (:func:`dandelion_lib.training.model.is_pretrained`)."""
    return settings.training.feature_cache and model_lib.is_pretrained(
        config.backbone, config.weights
    )


def feature_shards(config: TrainConfig, settings: Settings, *, store: Any = None) -> int:
    """How many extraction shards of ``settings.training.feature_shard_size`` images the dataset
    version of ``config`` has (at least one; extraction does nothing without the cache)."""
    if not caches_features(config, settings):
        return 1
    store = store or open_store(settings=settings)
    n = len(_shard_rows(load_data(config, settings, store)))
    return max(1, -(-n // settings.training.feature_shard_size))


def shard_rows(data: TrainingData, shard: int, size: int) -> pd.DataFrame:
    """The manifest rows of shard ``shard``: ``size`` images cut in sha256 order."""
    return _shard_rows(data).iloc[shard * size : (shard + 1) * size].reset_index(drop=True)


class _ShardPixels(StoredPixels):
    """A shard's images (or some of them, :meth:`take`): read from the store once, when a
    view first needs them (a shard is small), then served from memory to every view; never
    read when every view is cached."""

    def __init__(self, base: StoredPixels, at: Any = None, cache: list[Any] | None = None):
        positions = np.arange(len(base)) if at is None else np.asarray(at)
        super().__init__(base.store, base.rows.iloc[positions], base.spec)
        self.base, self.at = base, positions
        self.cache: list[Any] = [] if cache is None else cache

    def __getitem__(self, index: Any) -> np.ndarray:
        if not self.cache:
            self.cache.append(self.base[:])
        return np.asarray(self.cache[0][self.at[index]])

    def take(self, index: Any) -> StoredPixels:
        return _ShardPixels(self.base, self.at[index], self.cache)


def embed_shard(
    extractor: Any,
    rows: pd.DataFrame,
    config: TrainConfig,
    spec: FeatureSpec,
    *,
    store: Any,
    fstore: FeatureStore,
    dim: int,
) -> dict[str, int]:
    """Every view training will read of the images ``rows`` into ``fstore`` (unaugmented,
    and the augmented views of training images), computing only what is missing. Returns
    the counts of cached and computed embeddings and of ``images``."""
    counts: dict[str, int] = {}
    if len(rows):
        pixels = _ShardPixels(StoredPixels(store, rows, spec))
        shas = _shas(rows)
        split_features(extractor, pixels, shas, dim, fstore, counts)
        train = (rows["split"] == "train").to_numpy()
        train_shas = [sha for sha, t in zip(shas, train, strict=True) if t]
        augmented_features(extractor, pixels.take(train), train_shas, dim, config, fstore, counts)
        _add_augmented(counts)
    counts["images"] = len(rows)
    return counts
