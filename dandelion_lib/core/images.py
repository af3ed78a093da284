"""Image acceptance, defined once: which bytes dandelion takes as a photo, and why it refuses.

* :data:`ACCEPTED_FORMATS` and :data:`FORMAT_EXTENSIONS`: the one list of accepted formats.
* :class:`ImageLimits`: pixel, side and byte limits, taken from :class:`~dandelion_lib.core.config.
  Settings` (``DANDELION_MAX_IMAGE_PIXELS``, ``_MIN_IMAGE_SIDE``, ``_MAX_DOWNLOAD_BYTES``).
* :class:`RejectReason`: every reason an image is refused, with its HTTP status, problem code
  and description; :class:`InvalidImageError` carries one.
* :func:`sniff_format` reads only the header (unaccepted formats are refused unparsed),
  :func:`decode_image` decodes fully, and :func:`accept_image` does both: ingestion, feedback,
  the predictor (the API and ``dandelion predict``) all accept images through it.
* :func:`canonical_image`: the bytes that are stored for an accepted image (ingestion and
  feedback): nothing after the image's end, so a photo with an appended ZIP or HTML payload
  never enters the store byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dandelion_lib.core.config import ImageSettings, Settings

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
    default = ImageSettings.model_fields[name].default
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
            max_pixels=settings.images.max_image_pixels,
            min_side=settings.images.min_image_side,
            max_bytes=settings.images.max_download_bytes if with_bytes else None,
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


@dataclass(frozen=True)
class CanonicalImage:
    """What is stored for an accepted image: ``data`` in ``format`` (extension ``ext``).

    ``trailing_bytes`` were cut after the image's end marker; ``reencoded`` says the decoded
    pixels were re-encoded losslessly as PNG (formats whose end cannot be found reliably).
    """

    data: bytes
    format: str
    ext: str
    trailing_bytes: int = 0
    reencoded: bool = False

    @property
    def changed(self) -> bool:
        return self.reencoded or self.trailing_bytes > 0


def canonical_image(data: bytes, accepted: AcceptedImage) -> CanonicalImage:
    """The one rule for the bytes that are stored of an accepted image (``data``, accepted as
    ``accepted`` by :func:`accept_image`).

    * JPEG, PNG, WebP and GIF: the bytes up to the format's end (EOI marker, IEND chunk, RIFF
      size, GIF trailer), found by walking the file's structure (so an EOI inside an embedded
      thumbnail does not count). Ordinary files end there and are kept byte-identical; bytes
      after the end (an appended ZIP or HTML payload) are cut. The cut bytes must decode again.
    * BMP and TIFF (their end is not well defined) and any file whose end is not found: the
      decoded pixels re-encoded losslessly as PNG.
    """
    finder = _END_FINDERS.get(accepted.format)
    end = finder(data) if finder is not None else None
    if end is not None:
        if end == len(data):
            return CanonicalImage(data, accepted.format, accepted.ext)
        cut = data[:end]
        pixels = accepted.image.width * accepted.image.height
        with contextlib.suppress(InvalidImageError):
            again = decode_image(cut, max_pixels=pixels, min_side=1)
            if again.size == accepted.image.size and again.tobytes() == accepted.image.tobytes():
                return CanonicalImage(
                    cut, accepted.format, accepted.ext, trailing_bytes=len(data) - end
                )
    buf = io.BytesIO()
    accepted.image.save(buf, format="PNG", optimize=False)
    return CanonicalImage(buf.getvalue(), "PNG", FORMAT_EXTENSIONS["PNG"], reencoded=True)


def _jpeg_end(data: bytes) -> int | None:
    """Offset just after the EOI marker that ends the first image, walking the segments."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    i: int | None = 2
    while i is not None and i < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI
            return i
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        length = int.from_bytes(data[i : i + 2], "big") if i + 2 <= n else 0
        if length < 2:
            return None
        i += length
        if marker == 0xDA:  # SOS: entropy-coded data follows
            i = _jpeg_scan_end(data, i)
    return None


def _jpeg_scan_end(data: bytes, i: int) -> int | None:
    """Offset of the marker after entropy-coded data starting at ``i`` (stuffed ``FF 00``
    bytes and RSTn markers are part of the data)."""
    n = len(data)
    while True:
        j = data.find(b"\xff", i)
        if j < 0 or j + 1 >= n:
            return None
        following = data[j + 1]
        if following == 0xFF:  # fill byte before a marker
            i = j + 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed byte, RSTn
            i = j + 2
        else:
            return j


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_end(data: bytes) -> int | None:
    """Offset just after the IEND chunk (its CRC included)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        i += 12 + length
        if kind == b"IEND":
            return i if i <= n else None
    return None


def _webp_end(data: bytes) -> int | None:
    """Offset just after the RIFF container (its size field, padded to even)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    size = int.from_bytes(data[4:8], "little")
    end = 8 + size + (size & 1)
    return end if end <= len(data) else None


def _gif_end(data: bytes) -> int | None:
    """Offset just after the trailer (0x3B), walking the blocks."""
    n = len(data)
    if data[:6] not in (b"GIF87a", b"GIF89a") or n < 13:
        return None

    def sub_blocks(i: int) -> int | None:
        while i < n:
            size = data[i]
            i += 1
            if size == 0:
                return i
            i += size
        return None

    flags = data[10]
    i: int | None = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while i is not None and i < n:
        block = data[i]
        if block == 0x3B:
            return i + 1
        if block == 0x21:  # extension: label, then sub-blocks
            i = sub_blocks(i + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size
            if i + 10 > n:
                return None
            local = data[i + 9]
            i += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1
            i = sub_blocks(i)
        else:
            return None
    return None


_END_FINDERS = {"JPEG": _jpeg_end, "PNG": _png_end, "WEBP": _webp_end, "GIF": _gif_end}
