"""Fitting: the classification head on cached backbone features, the optional training on
pixels, and the open-set detector.

The default recipe (``backbone="efficientnet_lite0"``) freezes the pretrained backbone and
trains the head on its cached features (:mod:`dandelion_lib.training.extraction`) in
seconds, then refits it on train + val. An optional fine-tuning phase unfreezes the top
blocks and trains end to end on augmented pixels; ``small_cnn`` always trains end to end.
The open-set detector is fitted last, on the final model's features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from dandelion_lib.data.featurestore import FeatureStore
from dandelion_lib.training import model as model_lib
from dandelion_lib.training import openset
from dandelion_lib.training.config import TrainConfig, TrainingError
from dandelion_lib.training.extraction import embed_training_data, make_dataset
from dandelion_lib.training.inputs import Pixels, TrainingData

HEAD_LEARNING_RATE = 0.1
END_TO_END_LEARNING_RATE = 1e-3


class EpochLog:
    """Collects per-epoch metrics of every phase (``history``) and prints progress."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.history: dict[str, list[float]] = {}

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
                # Every epoch of slow phases; every 10th of the fast head fits.
                every = 10 if phase in ("head", "refit") else 1
                if outer.progress and (epoch % every == every - 1 or epoch + 1 == epochs):
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()))
                    print(f"[{phase}] epoch {epoch + 1}/{epochs}  {shown}", flush=True)

        return Callback()


class Laps:
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


def one_hot(y: np.ndarray, n: int) -> npt.NDArray[np.float32]:
    """Integer class indices -> one-hot rows of ``n`` classes."""
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
        one_hot(y, num_classes),
        val,
        epochs=epochs,
        learning_rate=config.learning_rate or HEAD_LEARNING_RATE,
        patience=config.patience if early_stop else epochs + 1,
        label_smoothing=config.label_smoothing,
        restore_best=early_stop and config.restore_best_weights,
        callback=callback,
    )
    return head


def _fit_heads(
    config: TrainConfig, data: TrainingData, train_x: list[np.ndarray], log: EpochLog
) -> Any:
    """Step 4: fit the head on the train features ``train_x`` (the unaugmented ones, then the
    augmented views) and, with ``refit_with_val``, refit it on train + val."""
    n = len(data.labels)
    feats, y = data.features, data.y
    val = (feats["val"], one_hot(y["val"], n))
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
    if not config.refit_with_val:
        return head
    # Same recipe, same number of epochs, on train + val: 60 more real images.
    epochs_run = len(log.history["loss"])
    return fit_cached_head(
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


def fit_cached(
    config: TrainConfig,
    backbone: model_lib.Backbone,
    data: TrainingData,
    extractor: Any,
    log: EpochLog,
    laps: Laps,
    *,
    fstore: FeatureStore | None,
) -> tuple[Any, dict[str, int]]:
    """Steps 3-4: the frozen backbone's features through ``extractor`` (original views read
    from the feature store ``fstore`` where cached, the rest and the augmented views
    extracted), fit the head on them and, with ``refit_with_val``, refit it on train + val.
    Returns the head and the counts of cached and computed features."""
    backbone.model.trainable = False
    views, counts = embed_training_data(extractor, data, config, fstore, backbone.feature_dim)
    laps.lap("extract_features")
    head = _fit_heads(config, data, [data.features["train"], *views], log)
    laps.lap("train_head")
    return head, counts


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


def fit_pixels(
    config: TrainConfig,
    backbone: model_lib.Backbone,
    full: Any,
    data: TrainingData,
    augmenter: Any,
    log: EpochLog,
    laps: Laps,
    *,
    end_to_end: bool,
) -> None:
    """Step 5 (optional): fine-tune the top blocks, or train end to end, on augmented pixels
    (read from the store batch by batch, :func:`~dandelion_lib.training.extraction.make_dataset`)."""
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
    config: TrainConfig,
    data: TrainingData,
    served: Callable[[Pixels], npt.NDArray[np.float32]],
) -> openset.OpenSetDetector | None:
    """Step 6: fit the out-of-domain detector on the final model's features of the train
    split (and the negatives' train split), then calibrate its threshold on the val split
    (every labelled source's) for ``openset_retention``, never below ``openset_floor``. ``served`` gives the served model's features of model inputs;
    the cached features stand in for them when the backbone stayed frozen. ``None`` when the
    method is ``none``."""
    method = resolve_openset_method(config, data)
    if method == "none":
        return None
    frozen = config.fine_tune_epochs <= 0

    def features(split: str) -> np.ndarray:
        if frozen and split in data.features:
            return data.features[split]
        return served(data.pixels[split])

    neg = data.negative_pixels.get("train")
    negatives = served(neg) if neg is not None and len(neg) else None
    detector = openset.OpenSetDetector(method=cast("openset.Method", method))
    detector.fit(features("train"), data.y["train"], negatives=negatives)
    floor = config.openset_floor
    if floor is None:
        floor = openset.score_floor(method, data.source_count)
    detector.calibrate(features("val"), config.openset_retention, floor=floor)
    return detector
