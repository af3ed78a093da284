"""Features, defined once: the model's input spec and per-image statistics.

* Bytes become an RGB ``PIL.Image`` through :func:`dandelion_lib.core.images.decode_image`
  (image acceptance lives in :mod:`dandelion_lib.core.images`).
* :class:`FeatureSpec` is the versioned model-input contract (size, colour mode, resize
  method). Training and the predictor both call :func:`to_model_input`, so there is no
  training/serving skew. Pixel normalisation lives inside the Keras model, which takes
  plain RGB pixels (``uint8`` values as float32).
* :func:`image_stats` computes the per-image statistics stored in the dataset manifest
  (the feature store's first table) and reused as the reference for drift monitoring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from PIL import Image

from dandelion_lib.core.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_image
from dandelion_lib.core.labels import DEFAULT_LABELS

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "STAT_COLUMNS",
    "FeatureSpec",
    "bytes_to_model_input",
    "hash_distance",
    "image_stats",
    "perceptual_hash",
    "to_model_input",
]

FEATURE_SPEC_VERSION = "1"
DEFAULT_IMAGE_SIZE = 352
"""Model input size in pixels. The backbone is convolutional, so any size works; on the
reference data 352 px beat 224 px (the backbone's pretraining size) in cross-validation:
small photos are upscaled and the flowers appear at the scale the backbone learned."""

DECODE_MARGIN = 2
"""Images are decoded at no less than this many times the model input per side."""

STAT_COLUMNS: tuple[str, ...] = (
    "brightness",
    "contrast",
    "saturation",
    "green_fraction",
    "yellow_fraction",
    "sharpness",
)
"""Per-image statistics, each in [0, 1]; data checks and drift monitoring use these."""


@dataclass(frozen=True)
class FeatureSpec:
    """The model-input contract, logged with every model."""

    version: str = FEATURE_SPEC_VERSION
    image_size: int = DEFAULT_IMAGE_SIZE
    color_mode: str = "RGB"
    resize_method: str = "bilinear"
    input_dtype: str = "float32"
    input_range: tuple[float, float] = (0.0, 255.0)
    normalization: str = "inside the model"
    labels: tuple[str, ...] = field(default=DEFAULT_LABELS)

    @property
    def decode_side(self) -> int:
        """The short side images are decoded at, at least (reduce-on-load,
        :func:`~dandelion_lib.core.images.decode_image`): twice the input, so the resize to
        the input still filters the full image as a full-size decode would."""
        return DECODE_MARGIN * self.image_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_range"] = list(self.input_range)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        d = dict(d)
        d["input_range"] = tuple(d.get("input_range", (0.0, 255.0)))
        d["labels"] = tuple(d.get("labels", DEFAULT_LABELS))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_model_input(img: Image.Image, spec: FeatureSpec | None = None) -> npt.NDArray[np.float32]:
    """Resize an RGB image to the spec; returns ``float32`` array ``(size, size, 3)`` in [0, 255]."""
    spec = spec or FeatureSpec()
    size = (spec.image_size, spec.image_size)
    if img.mode != spec.color_mode:
        img = img.convert(spec.color_mode)
    resized = img.resize(size, _RESAMPLE[spec.resize_method])
    return np.asarray(resized, dtype=np.float32)


def bytes_to_model_input(
    data: bytes, spec: FeatureSpec | None = None, **limits: int
) -> npt.NDArray[np.float32]:
    """:func:`~dandelion_lib.core.images.decode_image` then :func:`to_model_input`: the one path from bytes to model input."""
    spec = spec or FeatureSpec()
    img = decode_image(
        data,
        max_pixels=limits.get("max_pixels", DEFAULT_MAX_PIXELS),
        min_side=limits.get("min_side", DEFAULT_MIN_SIDE),
        decode_side=spec.decode_side,
    )
    return to_model_input(img, spec)


def image_stats(img: Image.Image) -> dict[str, float]:
    """Cheap per-image statistics (on a 64 px thumbnail) used for data checks and drift."""
    small = img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    gray = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
    colourful = (sat > 0.25) & (val > 0.2)
    lap = (
        -4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
    )
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "saturation": float(sat.mean()),
        "green_fraction": float((colourful & (hue >= 70) & (hue < 170)).mean()),
        "yellow_fraction": float((colourful & (hue >= 40) & (hue < 70)).mean()),
        "sharpness": float(min(np.sqrt(lap.var()) * 2.0, 1.0)),  # Laplacian std; ~0.3 typical
    }


PHASH_BITS = 64


def _dct_matrix(n: int) -> npt.NDArray[np.float64]:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return cast("npt.NDArray[np.float64]", m)


_DCT32 = _dct_matrix(32)


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash (pHash) as 16 hex digits.

    Visually similar images (resized, re-encoded, lightly edited) have hashes a few bits
    apart; compare with :func:`hash_distance`.
    """
    gray = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
