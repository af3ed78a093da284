"""The pixel steps of decoding an image (:func:`dandelion_lib.core.images.decode_image`): its
EXIF orientation, the reduction to the size a model needs, and the conversion to RGB."""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import ExifTags, Image


def oriented(img: Image.Image, decode_side: int | None) -> Image.Image:
    """``img`` reduced for ``decode_side`` (see :func:`_reduce`), its EXIF orientation applied
    (read before reducing: a reduced copy has no file to read it from)."""
    orientation = 1
    with contextlib.suppress(Exception):  # broken EXIF must not reject a valid image
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    if decode_side is not None:
        img = _reduce(img, decode_side)
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _reduce(img: Image.Image, side: int) -> Image.Image:
    """``img`` reduced by a whole factor (box filter) keeping its short side >= ``side``."""
    factor = min(img.size) // side
    if factor < 2:
        return img
    if img.mode in _UNREDUCIBLE_MODES:
        img = img.convert(_REDUCIBLE_AS.get(img.mode, "L"))
    return img.reduce(factor)


_REDUCIBLE_AS = {"P": "RGBA", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}
"""Modes Image.reduce cannot take, and the mode each is converted to first (16-bit grey to
32-bit, so that :func:`_to_rgb` still stretches its range); others ("1"): L."""
_UNREDUCIBLE_MODES = frozenset({"1", *_REDUCIBLE_AS})


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img
