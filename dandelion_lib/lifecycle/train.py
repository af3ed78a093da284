"""Training: a dataset version from the store -> a registered MLflow model (alias ``challenger``).

The default recipe (``backbone="efficientnet_lite0"``) freezes the pretrained backbone and
caches its features in the feature store: once for the unaugmented train/val/test images and
once for each of ``augment_copies`` augmented views of every training image (flip, rotation,
zoom, brightness, contrast; each image's view depends on the image alone, so it is cached
too). The classification head then trains on cached features in seconds.
An optional fine-tuning phase unfreezes the top blocks and trains end to end on augmented
pixels; ``small_cnn`` always trains end to end.

Its one job: turn a dataset version into a registered ``challenger``. :func:`train` reads top
to bottom as named steps (load data, load pixels, cache features and fit the head, refit,
optional pixel training, fit the open-set detector, evaluate, log to MLflow, register the
challenger); it never moves
``champion`` (:mod:`dandelion_lib.lifecycle.promotion` does). Images go from store bytes to model inputs
through :func:`dandelion_lib.data.dataset.load_examples`, the same path the
:class:`~dandelion_lib.serving.predict.Predictor` uses when serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import numpy.typing as npt
import pandas as pd
import tensorflow as tf
from keras import layers
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric

from dandelion_lib.core.config import UNKNOWN, Settings, cpu_limit, get_settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import DEFAULT_IMAGE_SIZE, STAT_COLUMNS, FeatureSpec
from dandelion_lib.core.storage import open_store
from dandelion_lib.data import dataset
from dandelion_lib.data.dataset import load_examples
from dandelion_lib.data.featurestore import (
    FeatureStore,
    cached_embeddings,
    feature_key,
    key_inputs,
    weights_digest,
)
from dandelion_lib.lifecycle import evaluate, monitoring, registry
from dandelion_lib.serving import runtime
from dandelion_lib.serving.predict import Predictor
from dandelion_lib.training import model as model_lib
from dandelion_lib.training import openset

HEAD_LEARNING_RATE = 0.1
END_TO_END_LEARNING_RATE = 1e-3


class TrainingError(DandelionError):
    """The training data or configuration cannot produce a model."""


@dataclass
class TrainConfig:
    """Every training parameter (all logged to MLflow)."""

    dataset_version: str | None = None
    """Dataset version to train on (default: the store's latest)."""
    backbone: str = "efficientnet_lite0"
    """efficientnet_lite0 (offline), mobilenet_v2, efficientnet_b0 (download) or small_cnn."""
    weights: str = "imagenet"
    """Backbone initialisation: imagenet or none."""
    image_size: int = DEFAULT_IMAGE_SIZE
    """Model input size in pixels (square; logged in the feature spec)."""
    epochs: int = 200
    """Head epochs on cached features (one full-batch step each; end-to-end epochs for
    small_cnn and untrained backbones)."""
    batch_size: int = 64
    learning_rate: float | None = None
    """None: 0.1 for the head on cached features (cosine decay), 1e-3 end to end."""
    l2: float = 2e-2
    """L2 penalty on the head's dense kernel."""
    dropout: float = 0.0
    label_smoothing: float = 0.0
    patience: int = 100
    """Early stopping: stop after this many epochs without val_loss improvement."""
    refit_with_val: bool = True
    """After early stopping, refit the head on train + val for the same number of epochs
    (cached-feature training only); the validation figures logged are those of the first fit."""
    restore_best_weights: bool = False
    """On early stopping, go back to the epoch of lowest val_loss (the tiny validation
    split makes that epoch noisy; the converged head generalises better)."""
    augment: bool = True
    augment_copies: int = 4
    """Augmented views per training image whose backbone features are cached."""
    flip: bool = True
    rotation: float = 0.04
    """Random rotation, as a fraction of a full turn (0.04 = +/- 14 degrees)."""
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    fine_tune_epochs: int = 0
    """End-to-end epochs with the top blocks unfrozen (0 = no fine-tuning)."""
    fine_tune_blocks: int = 2
    fine_tune_learning_rate: float = 1e-5
    seed: int = 42
    max_images_per_class: int | None = None
    """Use at most this many images per class and split (quick runs); None = all."""
    register: bool = True
    """Register the model in the registry with alias ``challenger``."""
    openset_method: str = "auto"
    """Open-set detector: ``auto`` (``logistic`` with negatives in the dataset, else
    ``mahalanobis``), one of :data:`dandelion_lib.training.openset.METHODS`, or ``none``."""
    openset_retention: float = openset.DEFAULT_RETENTION
    """Share of in-domain photos the detector's threshold keeps (calibrated on val)."""

    def to_params(self) -> dict[str, Any]:
        return {k: ("None" if v is None else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    model_version: str | None
    dataset_version: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)
    report: Any = field(default=None, repr=False)


# --------------------------------------------------------------------------------------
# Data: store -> model inputs -> tf.data
# --------------------------------------------------------------------------------------


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
    pixels: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    augmenter: Any = None,
    shuffle_seed: int | None = None,
    num_classes: int = 2,
) -> Any:
    """A ``tf.data`` pipeline: uint8 pixels -> float32 model inputs (optionally augmented).

    With ``labels`` it yields ``(inputs, one-hot labels)``; map calls are sequential so
    seeded augmentation is reproducible.
    """

    ds = tf.data.Dataset.from_tensor_slices(pixels if labels is None else (pixels, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(pixels), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def prepare(x: Any, y: Any = None) -> Any:
        x = tf.cast(x, tf.float32)
        if augmenter is not None:
            x = tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0)
        return x if y is None else (x, tf.one_hot(y, num_classes))

    return ds.map(prepare).prefetch(2)


class FeatureExtractor:
    """The frozen backbone: float32 pixels ``(N, size, size, 3)`` -> features ``(N, D)``.

    On the first batch it converts the backbone to FP32 ONNX Runtime and compares the two on
    that batch; where they agree within :data:`dandelion_lib.serving.runtime.FP32_PARITY_TOLERANCE`
    (largest absolute feature difference) every batch runs on ONNX Runtime (about twice as fast
    as TensorFlow on CPU), otherwise, or when the conversion fails, on the TensorFlow graph.
    Nothing is converted when every feature comes from the feature store. ``runtime`` says
    which one ran (``keras`` before the first batch), ``parity`` the difference measured.
    """

    def __init__(self, backbone: Any, *, fast: bool = True, threads: int | None = None) -> None:
        size = int(backbone.model.input_shape[1])
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.model = backbone.model
        self.size = size
        self.graph = tf.function(
            lambda x: backbone.model(x, training=False), input_signature=[spec]
        )
        self.fast = fast
        self.threads = threads or cpu_limit()
        self.runtime = "keras"
        self.parity: float | None = None
        self.note: str | None = None
        self._onnx: Any = None

    def __call__(self, batch: Any) -> npt.NDArray[np.float32]:
        if self.fast and self._onnx is None:
            self._convert(batch)
        if self._onnx is not None:
            return np.asarray(self._onnx(np.asarray(batch, dtype=np.float32))[1])
        return np.asarray(self.graph(batch))

    def _convert(self, probe: Any) -> None:
        self.fast = False  # one attempt
        with tempfile.TemporaryDirectory(prefix="dandelion-backbone-") as tmp:
            path = Path(tmp) / "backbone.onnx"
            try:
                runtime.export_fp32(self.model, self.size, path)
                onnx = runtime.OnnxForward(path, threads=self.threads, features=False)
                reference = np.asarray(self.graph(probe))
                got = np.asarray(onnx(np.asarray(probe, dtype=np.float32))[1])
            except Exception as exc:  # any conversion failure: TensorFlow stays
                self.note = f"ONNX conversion failed: {str(exc).splitlines()[0][:200]}"
                return
        self.parity = float(np.abs(reference - got).max()) if reference.size else 0.0
        if self.parity <= runtime.FP32_PARITY_TOLERANCE:
            self._onnx, self.runtime = onnx, "onnx"
        else:
            self.note = f"ONNX features differ by {self.parity:.1e}"


def feature_extractor(backbone: Any, settings: Settings | None = None) -> FeatureExtractor:
    """The backbone's feature extractor (ONNX Runtime where exact, see
    :class:`FeatureExtractor`; ``extraction_runtime=keras`` keeps TensorFlow)."""
    settings = settings or get_settings()
    return FeatureExtractor(
        backbone,
        fast=settings.extraction_runtime == "auto",
        threads=settings.inference_threads,
    )


def _extract(extractor: Any, dataset: Any, dim: int) -> npt.NDArray[np.float32]:
    parts = [np.asarray(extractor(batch), dtype=np.float32) for batch in dataset]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _log_extraction(extractor: Any) -> None:
    """Which runtime extracted the features (and its measured difference from TensorFlow)."""
    if not isinstance(extractor, FeatureExtractor):
        return
    mlflow.set_tag("extraction_runtime", extractor.runtime)
    if extractor.parity is not None:
        mlflow.log_metric("extraction_onnx_max_abs_diff", extractor.parity)
    if extractor.note:
        mlflow.set_tag("extraction_runtime_note", extractor.note)


def extract_features(extractor: Any, pixels: np.ndarray, dim: int) -> npt.NDArray[np.float32]:
    """Backbone features of ``pixels`` (uint8 model inputs), unaugmented."""
    return _extract(extractor, make_dataset(pixels), dim)


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
    pixels: np.ndarray,
    shas: list[str],
    dim: int,
    fstore: FeatureStore | None,
    counts: dict[str, int],
) -> npt.NDArray[np.float32]:
    """Unaugmented backbone features of ``pixels`` (images named by ``shas``): cached ones
    read from ``fstore``, the missing ones extracted and stored; ``counts`` adds up how many
    of each (``features_cached``, ``features_computed``)."""

    def compute(positions: list[int]) -> npt.NDArray[np.float32]:
        return extract_features(extractor, pixels[positions], dim)

    feats, cached, computed = cached_embeddings(fstore, shas, compute)
    _tally(counts, cached, computed)
    return feats


def _tally(counts: dict[str, int], cached: int, computed: int, suffix: str = "") -> None:
    """Add to ``features_cached<suffix>`` and ``features_computed<suffix>``."""
    for kind, n in (("cached", cached), ("computed", computed)):
        counts[f"features_{kind}{suffix}"] = counts.get(f"features_{kind}{suffix}", 0) + n


AUGMENT_ALGORITHM = 1
"""Bumped when :func:`augment_views` draws or applies its transformations differently."""


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
    pixels: np.ndarray,
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
            view = augment_views(pixels[positions], [shas[p] for p in positions], copy, config)
            return _extract(extractor, view, dim)

        feats, cached, computed = cached_embeddings(
            fstore, shas, compute, view=augmented_view_name(config, copy)
        )
        _tally(counts, cached, computed, "_augmented")
        views.append(feats)
    return views


# --------------------------------------------------------------------------------------
# Extraction ahead of training, in shards (the DAGs' mapped extract_features tasks)
# --------------------------------------------------------------------------------------


def _add_augmented(counts: dict[str, int]) -> None:
    """``features_cached`` / ``features_computed`` count every view, augmented ones too."""
    for kind in ("cached", "computed"):
        counts[f"features_{kind}"] += counts.get(f"features_{kind}_augmented", 0)


def config_from_params(params: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from notebook-style parameters: fields given as ``None`` and
    names that are not fields (``store_url``, ``run_id``, ...) are left at their defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in params.items() if k in fields and v is not None})


def _shard_rows(data: TrainingData) -> pd.DataFrame:
    """Every image training embeds (train, val and test; negatives go through the served
    model), in sha256 order: the order shards are cut from."""
    rows = pd.concat([data.splits[s] for s in ("train", "val", "test")], ignore_index=True)
    return rows.sort_values("sha256", kind="stable").reset_index(drop=True)


def caches_features(config: TrainConfig, settings: Settings) -> bool:
    """Whether training reads the feature store: the cache is on and the backbone is a
    frozen pretrained one (see :func:`train`'s ``end_to_end``)."""
    return settings.feature_cache and model_lib.is_pretrained(config.backbone, config.weights)


def feature_shards(
    config: TrainConfig, settings: Settings | None = None, *, store: Any = None
) -> int:
    """How many extraction shards of ``settings.feature_shard_size`` images the dataset
    version of ``config`` has (at least one; extraction does nothing without the cache)."""
    settings = settings or get_settings()
    if not caches_features(config, settings):
        return 1
    store = store or open_store(settings=settings)
    n = len(_shard_rows(load_data(config, settings, store)))
    return max(1, -(-n // settings.feature_shard_size))


def extract_feature_shard(
    config: TrainConfig,
    shard: int,
    settings: Settings | None = None,
    *,
    store: Any = None,
) -> dict[str, int]:
    """Put shard ``shard`` of the dataset version's embeddings into the feature store ahead
    of training: every view training will read (unaugmented, and the augmented views of
    training images), computing only what is missing. Returns the counts of cached and
    computed embeddings; empty when training does not cache features. Shards are cut from
    the images in sha256 order, ``settings.feature_shard_size`` each."""
    settings = settings or get_settings()
    if not caches_features(config, settings):
        return {}
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)
    size = settings.feature_shard_size
    rows = _shard_rows(data).iloc[shard * size : (shard + 1) * size].reset_index(drop=True)
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    fstore = open_feature_store(store, data.spec, backbone)
    extractor = feature_extractor(backbone, settings)
    counts: dict[str, int] = {}
    if len(rows):
        pixels = load_examples(store, rows, data.spec)
        shas = [str(v) for v in rows["sha256"]]
        split_features(extractor, pixels, shas, backbone.feature_dim, fstore, counts)
        train = (rows["split"] == "train").to_numpy()
        train_shas = [sha for sha, t in zip(shas, train, strict=True) if t]
        augmented_features(
            extractor, pixels[train], train_shas, backbone.feature_dim, config, fstore, counts
        )
        _add_augmented(counts)
    counts["images"] = len(rows)
    return counts


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


class _EpochLog:
    """Collects per-epoch metrics of every phase (logged to MLflow) and prints progress."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.history: dict[str, list[float]] = {}
        self.step = 0

    def callback(self, phase: str, epochs: int) -> Any:

        outer = self

        # keras ships no type information, so its Callback base class is Any to mypy.
        class Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
                if phase == "refit":  # validation data is in the training set here
                    logs = {f"refit_{k}": v for k, v in logs.items() if not k.startswith("val_")}
                else:
                    outer.history.setdefault("phase", []).append(0.0 if phase == "head" else 1.0)
                for k, v in logs.items():
                    outer.history.setdefault(k, []).append(v)
                outer.step += 1
                # Every epoch of slow phases; every 10th of the fast head fits.
                every = 10 if phase in ("head", "refit") else 1
                if outer.progress and (epoch % every == every - 1 or epoch + 1 == epochs):
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()))
                    print(f"[{phase}] epoch {epoch + 1}/{epochs}  {shown}", flush=True)

        return Callback()

    def log_to_mlflow(self) -> None:

        run = mlflow.active_run()
        if run is None:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(key=k, value=v, timestamp=now, step=i)
            for k, values in self.history.items()
            if k != "phase"
            for i, v in enumerate(values)
        ]
        client = MlflowClient()
        for start in range(0, len(metrics), 900):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 900])


def _subset(manifest: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """Deterministic subset: at most ``limit`` images per (split, label), by sha256 order."""
    frame = manifest.sort_values("sha256")
    if limit is None:
        return frame.reset_index(drop=True)
    return frame.groupby(["split", "label"], sort=False).head(limit).reset_index(drop=True)


def _one_hot(y: np.ndarray, n: int) -> npt.NDArray[np.float32]:
    return cast("npt.NDArray[np.float32]", np.eye(n, dtype=np.float32)[y])


def fit_head(
    head: Any,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    learning_rate: float,
    patience: int,
    label_smoothing: float = 0.0,
    restore_best: bool = False,
    callback: Any = None,
) -> int:
    """Full-batch training of the head on cached features; returns the epochs run.

    One graph step per epoch (cosine-decayed Adam), so hundreds of epochs take about a
    second: the regularised head converges to the same solution whatever the seed. Early
    stopping watches ``val_loss`` and restores the best weights.
    """

    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, epochs))
    tx, ty = tf.constant(x, tf.float32), tf.constant(y, tf.float32)
    vx, vy = tf.constant(val[0], tf.float32), tf.constant(val[1], tf.float32)

    def measure(inputs: Any, targets: Any, training: bool) -> tuple[Any, Any, Any]:
        probs = head(inputs, training=training)
        loss = loss_fn(targets, probs) + tf.add_n([tf.constant(0.0), *head.losses])
        hits = tf.equal(tf.argmax(probs, axis=1), tf.argmax(targets, axis=1))
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32)), probs

    # tf.function is untyped; the graph function it returns keeps the Python signature.
    @cast(
        "Callable[[Callable[[], tuple[Any, Any, Any, Any]]], Callable[[], tuple[Any, Any, Any, Any]]]",
        tf.function(autograph=False),
    )
    def epoch_step() -> tuple[Any, Any, Any, Any]:
        with tf.GradientTape() as tape:
            loss, acc, _ = measure(tx, ty, True)
        grads = tape.gradient(loss, head.trainable_variables)
        optimizer.apply_gradients(zip(grads, head.trainable_variables, strict=True))
        val_loss, val_acc, _ = measure(vx, vy, False)
        return loss, acc, val_loss, val_acc

    best, best_weights, waited, run = np.inf, head.get_weights(), 0, 0
    for epoch in range(epochs):
        loss, acc, val_loss, val_acc = (float(v) for v in epoch_step())
        run = epoch + 1
        if callback is not None:
            logs = {"loss": loss, "accuracy": acc, "val_loss": val_loss, "val_accuracy": val_acc}
            callback.on_epoch_end(epoch, logs)
        if val_loss < best - 1e-6:
            best, best_weights, waited = val_loss, head.get_weights(), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if restore_best:
        head.set_weights(best_weights)
    return run


def fit_cached_head(
    config: TrainConfig,
    num_classes: int,
    originals: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    early_stop: bool = True,
    callback: Any = None,
) -> Any:
    """A fresh head of ``config``'s recipe, trained on cached features.

    The head standardises with the statistics of ``originals`` (the unaugmented features),
    then :func:`fit_head` trains it on ``x`` with integer labels ``y``. Without
    ``early_stop`` it runs all ``epochs`` (``val`` is then only measured).
    """

    keras.utils.set_random_seed(config.seed)
    head = model_lib.build_head(
        originals.shape[1],
        num_classes,
        config.dropout,
        config.seed,
        l2=config.l2,
        adapt=originals,
    )
    fit_head(
        head,
        x,
        _one_hot(y, num_classes),
        val,
        epochs=epochs,
        learning_rate=config.learning_rate or HEAD_LEARNING_RATE,
        patience=config.patience if early_stop else epochs + 1,
        label_smoothing=config.label_smoothing,
        restore_best=early_stop and config.restore_best_weights,
        callback=callback,
    )
    return head


def _fit(model: Any, data: Any, val: Any, *, epochs: int, config: TrainConfig, cb: Any) -> Any:
    """Keras ``fit`` for end-to-end phases (pixels through the backbone)."""

    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=min(config.patience, 10),
        restore_best_weights=config.restore_best_weights,
    )
    return model.fit(
        data, validation_data=val, epochs=epochs, callbacks=[stop, cb], verbose=0, shuffle=False
    )


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

    def negative_kinds(self, split: str) -> list[str]:
        rows = self.negatives.get(split)
        return [] if rows is None else [dataset.negative_kind(s) for s in rows["source"]]


class _Laps:
    """Wall-clock seconds of each training step (logged as ``seconds_<step>``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.mark = self.started
        self.timings: dict[str, float] = {}

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.mark, 3)
        self.mark = now


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


def fit_cached(
    config: TrainConfig,
    backbone: Any,
    data: TrainingData,
    log: _EpochLog,
    laps: _Laps,
    *,
    fstore: FeatureStore | None = None,
    settings: Settings | None = None,
) -> Any:
    """Steps 3-4: the frozen backbone's features (original views read from the feature
    store ``fstore`` where cached, the rest and the augmented views extracted), fit the
    head on them and, with ``refit_with_val``, refit it on train + val. Logs how many
    features were cached and computed."""
    n = len(data.labels)
    pixels, y = data.pixels, data.y
    backbone.model.trainable = False
    extractor = feature_extractor(backbone, settings)
    dim = backbone.feature_dim
    counts: dict[str, int] = {}
    feats = {
        s: split_features(
            extractor, p, [str(v) for v in data.splits[s]["sha256"]], dim, fstore, counts
        )
        for s, p in pixels.items()
    }
    data.features = feats
    train_shas = [str(v) for v in data.splits["train"]["sha256"]]
    views = augmented_features(extractor, pixels["train"], train_shas, dim, config, fstore, counts)
    _add_augmented(counts)
    mlflow.log_metrics({k: float(v) for k, v in counts.items()})
    mlflow.log_param("feature_store_key", fstore.key if fstore is not None else "None")
    _log_extraction(extractor)
    train_x = [feats["train"], *views]
    laps.lap("extract_features")
    val = (feats["val"], _one_hot(y["val"], n))
    head = fit_cached_head(
        config,
        n,
        feats["train"],
        np.concatenate(train_x),
        np.concatenate([y["train"]] * len(train_x)),
        val,
        epochs=config.epochs,
        callback=log.callback("head", config.epochs),
    )
    if config.refit_with_val:
        # Same recipe, same number of epochs, on train + val: 60 more real images.
        epochs_run = len(log.history["loss"])
        head = fit_cached_head(
            config,
            n,
            np.concatenate([feats["train"], feats["val"]]),
            np.concatenate([*train_x, feats["val"]]),
            np.concatenate([y["train"]] * len(train_x) + [y["val"]]),
            val,
            epochs=epochs_run,
            early_stop=False,
            callback=log.callback("refit", epochs_run),
        )
    laps.lap("train_head")
    return head


def fit_pixels(
    config: TrainConfig,
    backbone: Any,
    full: Any,
    data: TrainingData,
    augmenter: Any,
    log: _EpochLog,
    laps: _Laps,
    *,
    end_to_end: bool,
) -> None:
    """Step 5 (optional): fine-tune the top blocks, or train end to end, on augmented pixels."""
    epochs = config.epochs if end_to_end else config.fine_tune_epochs
    if epochs <= 0:
        return
    if end_to_end:
        lr = config.learning_rate or END_TO_END_LEARNING_RATE
        backbone.model.trainable = True
    else:
        lr = config.fine_tune_learning_rate
        model_lib.set_trainable_top(backbone, config.fine_tune_blocks)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    full.compile(keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"])
    n = len(data.labels)
    train_ds = make_dataset(
        data.pixels["train"],
        data.y["train"],
        batch_size=config.batch_size,
        augmenter=augmenter,
        shuffle_seed=config.seed,
        num_classes=n,
    )
    val_ds = make_dataset(
        data.pixels["val"], data.y["val"], batch_size=config.batch_size, num_classes=n
    )
    phase = "end_to_end" if end_to_end else "fine_tune"
    _fit(full, train_ds, val_ds, epochs=epochs, config=config, cb=log.callback(phase, epochs))
    laps.lap(phase)


def resolve_openset_method(config: TrainConfig, data: TrainingData) -> str:
    """The open-set method to fit: ``auto`` is ``logistic`` with negatives, else
    ``mahalanobis`` (the best method without negatives, docs/open-set.md)."""
    has_negatives = len(data.negatives.get("train", ())) > 0
    method = config.openset_method
    if method == "auto":
        return "logistic" if has_negatives else "mahalanobis"
    if method != "none" and method not in openset.METHODS:
        raise TrainingError(
            f"unknown open-set method {method!r}; choose auto, none or one of {openset.METHODS}"
        )
    if method in openset.NEGATIVE_METHODS and not has_negatives:
        raise TrainingError(
            f"open-set method {method!r} needs negatives in the dataset "
            "(ingest them with DANDELION_NEGATIVES_SOURCE)"
        )
    return method


def fit_open_set(
    config: TrainConfig, full: Any, data: TrainingData, laps: _Laps
) -> openset.OpenSetDetector | None:
    """Step 6: fit the out-of-domain detector on the final model's features of the train
    split (and the negatives' train split), then calibrate its threshold on the val split
    for ``openset_retention``. The features are the served ones (the cached features when
    the backbone stayed frozen)."""
    method = resolve_openset_method(config, data)
    if method == "none":
        return None
    served = Predictor(model=full, spec=data.spec)
    frozen = config.fine_tune_epochs <= 0

    def features(split: str) -> np.ndarray:
        if frozen and split in data.features:
            return data.features[split]
        return served.features(data.pixels[split])

    neg = data.negative_pixels.get("train")
    negatives = served.features(neg) if neg is not None and len(neg) else None
    detector = openset.OpenSetDetector(method=cast("openset.Method", method))
    detector.fit(features("train"), data.y["train"], negatives=negatives)
    detector.calibrate(features("val"), config.openset_retention)
    mlflow.log_params(
        {
            "openset_method_resolved": method,
            "negatives_train": 0 if negatives is None else len(negatives),
            "negatives_test": len(data.negatives.get("test", ())),
        }
    )
    mlflow.log_metric("openset_threshold", float(detector.threshold or 0.0))
    laps.lap("fit_open_set")
    return detector


def evaluate_model(
    full: Any,
    data: TrainingData,
    history: dict[str, list[float]],
    *,
    log_val: bool,
    detector: openset.OpenSetDetector | None = None,
) -> evaluate.EvaluationReport:
    """Step 7: score the test split (and, with ``log_val``, the val split) through the
    serving path, with the open-set detector and the negatives' test split; log them."""
    predictor = Predictor(model=full, spec=data.spec, detector=detector)

    def score(split: str) -> evaluate.EvaluationReport:
        return evaluate.evaluate_arrays(
            predictor,
            data.pixels[split],
            data.y[split],
            data.splits[split],
            source=f"dataset {data.version} ({split} split)",
            negatives=(data.negative_pixels.get(split), data.negative_kinds(split)),
        )

    report = score("test")
    if log_val:  # the refit head has seen val: its val figures would say nothing
        mlflow.log_metrics(score("val").scalar_metrics("val_final_"))
    evaluate.log_report(report, data.pixels["test"], prefix="test_")
    _log_learning_curves(history)
    return report


def log_run_inputs(config: TrainConfig, store: Any, data: TrainingData) -> None:
    """Step 8a: the configuration, the dataset version and the split sizes, to MLflow."""
    mlflow.log_params(config.to_params() | {"dataset_version_resolved": data.version})
    _log_dataset(store, data.manifest, data.version)
    mlflow.log_params(
        {f"images_{s}": len(rows) for s, rows in data.splits.items()}
        | {"feature_spec_version": data.spec.version, "image_size": data.spec.image_size}
    )


def build_runtime(
    full: Any, data: TrainingData, settings: Settings, out_dir: Path
) -> runtime.RuntimeRecord:
    """Step 8b': the served runtime artifacts (FP32 ONNX, checked against Keras on the
    validation split — or the test split when there is no validation split — and INT8
    calibrated on the first ``int8_calibration_images`` training images). A failed FP32
    parity check stops registration (:class:`dandelion_lib.serving.runtime.RuntimeParityError`)."""
    parity = data.pixels["val"] if len(data.pixels.get("val", ())) else data.pixels["test"]
    calibration = data.pixels["train"][: settings.int8_calibration_images]
    record = runtime.build(
        full,
        data.spec.image_size,
        out_dir,
        keras_forward=runtime.keras_forward(full, data.spec.image_size),
        parity_pixels=np.asarray(parity, dtype=np.float32),
        calibration_pixels=np.asarray(calibration, dtype=np.float32) if len(calibration) else None,
        threads=settings.inference_threads or cpu_limit(),
    )
    mlflow.log_dict(record.to_dict(), "runtime_parity.json")
    for precision, figures in record.parity.items():
        mlflow.log_metric(f"runtime_{precision}_max_abs_diff", float(figures["max_abs_diff"]))
        mlflow.log_metric(f"runtime_{precision}_label_flips", float(figures["label_flips"]))
    return record


def log_model(
    full: Any,
    data: TrainingData,
    metrics: dict[str, float],
    settings: Settings,
    *,
    register: bool,
    detector: openset.OpenSetDetector | None = None,
) -> tuple[str, str | None]:
    """Step 8b: log the model (and its open-set detector) with its metadata; with ``register``, register it as the
    ``challenger`` (and nothing more: promotion is :mod:`dandelion_lib.lifecycle.promotion`'s job).
    Returns the model URI and the registered version."""
    reference = monitoring.build_reference(data.splits["train"][list(STAT_COLUMNS)])
    with tempfile.TemporaryDirectory(prefix="dandelion-runtime-") as tmp:
        record = build_runtime(full, data, settings, Path(tmp) / runtime.DIR)
        logged = registry.log_keras_model(
            full,
            feature_spec=data.spec.to_dict(),
            drift_reference=reference,
            metrics=metrics,
            dataset_version=data.version,
            registered_model_name=settings.model_name if register else None,
            input_example=data.pixels["test"][:1].astype(np.float32),
            detector=detector,
            runtime_dir=Path(tmp) / runtime.DIR,
            runtime_record=record.to_dict(),
        )
    if not register:
        return logged.model_uri, None
    version = str(logged.version)
    registry.register_challenger(mlflow.MlflowClient(), settings.model_name, version, data.version)
    return f"models:/{settings.model_name}/{version}", version


def train(
    config: TrainConfig | None = None,
    settings: Settings | None = None,
    *,
    store: Any = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train, evaluate on the test split, log everything to MLflow and register the model
    as the ``challenger``. Each step is a function above; this reads them in order."""
    config = config or TrainConfig()
    settings = settings or get_settings()
    progress = sys.stdout.isatty() if progress is None else progress
    laps = _Laps()
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    laps.restart()
    # The backbone first: a missing download fails before any image is read.
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    laps.lap("build_backbone")
    load_pixels(data, store)
    laps.lap("load_images")
    augmenter = make_augmenter(config)
    log = _EpochLog(progress)
    end_to_end = not backbone.pretrained  # model.is_pretrained: small_cnn never is

    registry.configure_mlflow(settings)
    registry.use_experiment(settings)
    with mlflow.start_run(run_name=f"train-{config.backbone}") as run:
        log_run_inputs(config, store, data)
        if end_to_end:
            head = model_lib.build_head(
                backbone.feature_dim, len(data.labels), config.dropout, config.seed, l2=config.l2
            )
        else:
            fstore = (
                open_feature_store(store, data.spec, backbone) if settings.feature_cache else None
            )
            head = fit_cached(config, backbone, data, log, laps, fstore=fstore, settings=settings)
        full = model_lib.assemble(backbone, head, freeze_batchnorm=not end_to_end)
        fit_pixels(config, backbone, full, data, augmenter, log, laps, end_to_end=end_to_end)
        log.log_to_mlflow()

        detector = fit_open_set(config, full, data, laps)
        log_val = end_to_end or not config.refit_with_val
        report = evaluate_model(full, data, log.history, log_val=log_val, detector=detector)
        laps.lap("evaluate")
        metrics = report.scalar_metrics("test_")
        uri, model_version = log_model(
            full, data, metrics, settings, register=config.register, detector=detector
        )
        laps.lap("log_model")
        seconds = time.perf_counter() - laps.started
        mlflow.log_metrics(
            {"train_seconds": seconds} | {f"seconds_{k}": v for k, v in laps.timings.items()}
        )
        run_id = run.info.run_id

    return TrainResult(
        run_id=run_id,
        model_uri=uri,
        model_version=model_version,
        dataset_version=data.version,
        metrics=metrics,
        history=log.history,
        seconds=seconds,
        timings=laps.timings,
        model=full,
        report=report,
    )


def _log_dataset(store: Any, manifest: pd.DataFrame, version: str) -> None:
    """The dataset version as an MLflow dataset input, with the manifest's digest."""

    key = dataset.manifest_key(version)
    info = store.info(key)
    digest = (info.sha256 if info and info.sha256 else None) or hashlib.sha256(
        pd.util.hash_pandas_object(manifest, index=False).to_numpy().tobytes()
    ).hexdigest()
    source = f"{store.url.rstrip('/')}/{key}"
    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources: not actionable here.
        warnings.simplefilter("ignore", UserWarning)
        try:
            ds = from_pandas(
                manifest,
                source=source,
                targets="label",
                name=f"dandelion@{version}",
                digest=digest[:32],
            )
        except Exception:  # an unknown source scheme: keep the dataset, without its source
            ds = from_pandas(
                manifest, targets="label", name=f"dandelion@{version}", digest=digest[:32]
            )
        mlflow.log_input(
            ds, context="training", tags={"version": version, "manifest_sha256": digest}
        )
    mlflow.set_tags(
        {"dataset_version": version, "dataset_manifest_sha256": digest, "dataset_source": source}
    )


def _log_learning_curves(history: dict[str, list[float]]) -> None:

    fig = learning_curves_figure(history)
    mlflow.log_figure(fig, "figures/learning_curves.png")
    plt.close(fig)


def learning_curves_figure(history: dict[str, list[float]]) -> Any:
    """Loss and accuracy per epoch (train and validation)."""

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--"), (f"refit_{metric}", ":")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        phases = history.get("phase", [])
        if phases and max(phases) > 0:
            ax.axvline(phases.index(1.0) + 0.5, color="grey", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# CLI: dandelion train
# --------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            kinds = {"max_images_per_class": int, "learning_rate": float}
            parser.add_argument(flag, type=kinds.get(f.name, str), default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def cli(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    result = train(config, progress=True)
    m = result.metrics
    print(
        f"trained on dataset {result.dataset_version} in {result.seconds:.1f} s: "
        f"test accuracy {m['test_accuracy']:.4f}, F1 {m['test_f1']:.4f}, "
        f"ROC AUC {m.get('test_roc_auc', float('nan')):.4f}, ECE {m['test_ece']:.4f}"
    )
    where = (
        f"registered as {result.model_uri} (alias challenger)"
        if result.model_version
        else result.model_uri
    )
    print(f"run {result.run_id}; {where}")
    return 0
