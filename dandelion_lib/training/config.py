"""The training recipe: every parameter of one training run (:class:`TrainConfig`, all logged
to MLflow) and the error a recipe or its data raise when they cannot produce a model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import DEFAULT_IMAGE_SIZE
from dandelion_lib.training import openset


class TrainingError(DandelionError):
    """The training data or configuration cannot produce a model."""


@dataclass
class TrainConfig:
    """Every training parameter (all logged to MLflow)."""

    dataset_version: str | None = None
    """Dataset version to train on (default: the store's latest)."""
    backbone: str = "efficientnet_lite0"
    """efficientnet_lite0 (offline), mobilenet_v2, efficientnet_b0 (download), small_cnn, or
    stand_in (a fixed, untrained stand-in for fast tests: not a real classifier)."""
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
    openset_floor: float | None = None
    """Lowest threshold of the detector; None: :func:`dandelion_lib.training.openset.score_floor`
    (``logistic``: 1.0 with two or more labelled sources, 3.0 with one)."""

    def to_params(self) -> dict[str, Any]:
        return {k: ("None" if v is None else v) for k, v in dataclasses.asdict(self).items()}


def config_from_params(params: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from notebook-style parameters: fields given as ``None`` and
    names that are not fields (``store_url``, ``run_id``, ...) are left at their defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in params.items() if k in fields and v is not None})
