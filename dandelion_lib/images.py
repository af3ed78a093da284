"""Image acceptance, defined once: which bytes dandelion takes as a photo, and why it refuses.

* :data:`ACCEPTED_FORMATS` and :data:`FORMAT_EXTENSIONS`: the one list of accepted formats.
* :class:`ImageLimits`: pixel, side and byte limits, taken from :class:`~dandelion_lib.config.
  Settings` (``DANDELION_MAX_IMAGE_PIXELS``, ``_MIN_IMAGE_SIDE``, ``_MAX_DOWNLOAD_BYTES``).
* :class:`RejectReason`: every reason an image is refused, with its HTTP status, problem code
  and description; :class:`InvalidImageError` carries one.
* :func:`sniff_format` reads only the header (unaccepted formats are refused unparsed),
  :func:`decode_image` decodes fully, and :func:`accept_image` does both: ingestion, feedback,
  the predictor (the API and ``dandelion predict``) all accept images through it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dandelion_lib.config import Settings

ImageFile.LOAD_TRUNCATED_IMAGES = False

FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
"""Accepted image formats (Pillow's names) and the file extension each is stored under."""

ACCEPTED_FORMATS: tuple[str, ...] = tuple(FORMAT_EXTENSIONS)
"""The formats dandelion decodes; anything else (SVG, PDF, PSD, EPS, ICO, ...) is refused."""

_FORMAT_ALIASES = {"MPO": "JPEG"}  # multi-picture JPEG from cameras: a JPEG first frame
_ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"


class RejectReason(StrEnum):
    """Why an image is refused; each carries its HTTP status, problem code and description."""

    status: int
    problem: str
    description: str

    def __new__(cls, value: str, status: int, problem: str, description: str) -> RejectReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.problem = problem
        member.description = description
        return member

    EMPTY = ("empty", 400, "empty-image", "zero-byte file")
    NOT_AN_IMAGE = (
        "not_an_image",
        415,
        "unsupported-image",
        "not a decodable image (e.g. an HTML error page served with 200)",
    )
    UNSUPPORTED_FORMAT = (
        "unsupported_format",
        415,
        "unsupported-image",
        "an image format outside FORMAT_EXTENSIONS",
    )
    TRUNCATED = ("truncated", 422, "corrupt-image", "truncated or corrupt image data")
    TOO_LARGE = (
        "too_large",
        413,
        "image-too-large",
        "more pixels than max_image_pixels (decompression bomb) or bytes than max_download_bytes",
    )
    TOO_SMALL = ("too_small", 422, "image-too-small", "a side shorter than min_image_side")

    @classmethod
    def of(cls, value: str) -> RejectReason:
        """The member for a reason code; ``ValueError`` for an unknown one."""
        for member in cls:
            if member.value == value:
                return member
        raise ValueError(f"unknown image reject reason: {value!r}")


class InvalidImageError(ValueError):
    """Bytes that are not a usable image; ``reason`` is a :class:`RejectReason`."""

    def __init__(self, reason: RejectReason | str, message: str):
        super().__init__(message)
        self.reason = reason if isinstance(reason, RejectReason) else RejectReason.of(reason)


def _setting_default(name: str) -> int:
    default = Settings.model_fields[name].default
    assert isinstance(default, int)
    return default


DEFAULT_MAX_PIXELS: int = _setting_default("max_image_pixels")
DEFAULT_MIN_SIDE: int = _setting_default("min_image_side")


@dataclass(frozen=True)
class ImageLimits:
    """Size limits of an accepted image; the defaults are the Settings' defaults."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_bytes: int | None = None
    """Larger inputs are refused before decoding; ``None``: no byte limit here (the API's
    body limit applies before)."""

    @classmethod
    def from_settings(cls, settings: Settings, *, with_bytes: bool = False) -> ImageLimits:
        return cls(
            max_pixels=settings.max_image_pixels,
            min_side=settings.min_image_side,
            max_bytes=settings.max_download_bytes if with_bytes else None,
        )


@dataclass(frozen=True)
class AcceptedImage:
    """A fully decoded RGB image and the format it came in."""

    image: Image.Image
    format: str
    ext: str


def sniff_format(data: bytes) -> str:
    """The accepted format of ``data`` from its header, or :class:`InvalidImageError`.

    Only accepted formats are parsed; the header of any other is matched against Pillow's
    signatures without opening it, to tell an unaccepted image format from a non-image.
    """
    if not data:
        raise InvalidImageError(RejectReason.EMPTY, "the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as probe:
            fmt = probe.format or ""
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(RejectReason.TOO_LARGE, f"image is too large: {exc}") from None
    except UnidentifiedImageError:
        if _signature_of(data, ACCEPTED_FORMATS):  # an accepted format, broken inside
            raise InvalidImageError(
                RejectReason.TRUNCATED, "the image is corrupt (its header cannot be read)"
            ) from None
        other = _other_format(data)
        if other:
            raise InvalidImageError(
                RejectReason.UNSUPPORTED_FORMAT,
                f"{other} images are not accepted; send {_ACCEPTED_TEXT}",
            ) from None
        raise InvalidImageError(
            RejectReason.NOT_AN_IMAGE,
            f"the file is not a supported image; send {_ACCEPTED_TEXT}",
        ) from None
    except Exception as exc:  # a broken header of an accepted format
        raise InvalidImageError(RejectReason.TRUNCATED, _corrupt(exc)) from None
    return _FORMAT_ALIASES.get(fmt, fmt)


def _signature_of(data: bytes, formats: tuple[str, ...]) -> str | None:
    """The first of ``formats`` whose header signature ``data`` has (Pillow's check only)."""
    Image.init()
    prefix = data[:16]
    for fmt in formats:
        _factory, accept = Image.OPEN.get(fmt, (None, None))
        if accept is None:
            continue
        with contextlib.suppress(Exception):
            if accept(prefix):
                return fmt
    return None


def _other_format(data: bytes) -> str | None:
    """Pillow's name for a format outside the accepted ones, by header signature only."""
    Image.init()
    prefix = data[:16]
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt in ACCEPTED_FORMATS or fmt in _FORMAT_ALIASES or accept is None:
            continue
        with contextlib.suppress(Exception):
            if accept(prefix):
                return fmt
    return None


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Decode untrusted bytes fully into an RGB image (EXIF orientation applied).

    Raises :class:`InvalidImageError` for empty, non-image, truncated, oversized
    (decompression bomb) or too small inputs. The first frame of an animation is used.
    """
    if not data:
        raise InvalidImageError(RejectReason.EMPTY, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    RejectReason.TOO_LARGE,
                    f"image is {width}x{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,}",
                )
            img.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(RejectReason.TOO_LARGE, f"image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            RejectReason.NOT_AN_IMAGE, "the file is not a supported image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(
            RejectReason.TRUNCATED, f"the image is truncated or corrupt ({exc})"
        ) from None
    if min(width, height) < min_side:
        raise InvalidImageError(
            RejectReason.TOO_SMALL,
            f"image is {width}x{height}; each side must be at least {min_side} px",
        )
    # Broken EXIF must not reject an otherwise valid image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img) or img
    return _to_rgb(img)


def accept_image(data: bytes, limits: ImageLimits | None = None) -> AcceptedImage:
    """The acceptance rule: byte limit, header sniff, full decode within the pixel limits.

    Every failure, including decoders failing in unexpected ways on hostile input, is an
    :class:`InvalidImageError`.
    """
    limits = limits or ImageLimits()
    if not data:
        raise InvalidImageError(RejectReason.EMPTY, "the file is empty")
    if limits.max_bytes is not None and len(data) > limits.max_bytes:
        raise InvalidImageError(RejectReason.TOO_LARGE, f"more than {limits.max_bytes:,} bytes")
    fmt = sniff_format(data)
    try:
        img = decode_image(data, max_pixels=limits.max_pixels, min_side=limits.min_side)
    except InvalidImageError:
        raise
    except Exception as exc:  # malformed files can make decoders fail in odd ways
        raise InvalidImageError(RejectReason.TRUNCATED, _corrupt(exc)) from None
    return AcceptedImage(img, fmt, FORMAT_EXTENSIONS[fmt])


def _corrupt(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"the image is corrupt ({type(exc).__name__}{': ' + first if first else ''})"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img
