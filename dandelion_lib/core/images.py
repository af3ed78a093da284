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
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image, ImageFile, UnidentifiedImageError

from dandelion_lib.core.config import ImageSettings, Settings
from dandelion_lib.core.image_bytes import END_FINDERS, METADATA_STRIPPERS
from dandelion_lib.core.pixels import oriented, to_rgb

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
    decode_side: int | None = None
    """Decode at the size a model needs: the short side is reduced on load to no less than
    this (:func:`decode_image`); ``None``: full size (images that are stored)."""

    @classmethod
    def from_settings(cls, settings: Settings, *, with_bytes: bool = False) -> ImageLimits:
        return cls(
            max_pixels=settings.images.max_image_pixels,
            min_side=settings.images.min_image_side,
            max_bytes=settings.images.max_download_bytes if with_bytes else None,
        )


class DecodeBudgetExceeded(Exception):
    """The decodes in flight hold the whole :class:`DecodeBudget`: try again shortly."""

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DecodeBudget:
    """Bytes that decodes in flight may hold together; thread-safe.

    Each decode reserves its worst case (:func:`decode_cost`, from the image's header) for
    as long as it decodes. One that does not fit beside those in flight is refused at once
    (:class:`DecodeBudgetExceeded`, a 503 in the API); one whose worst case alone exceeds
    the budget is too large to decode here at all (:class:`InvalidImageError`, too large).
    """

    def __init__(self, limit_bytes: int):
        if limit_bytes < 1:
            raise ValueError("a decode budget needs limit_bytes >= 1")
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._held = 0
        self.refused = 0

    @property
    def held(self) -> int:
        return self._held

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        if cost > self.limit_bytes:
            raise InvalidImageError(
                RejectReason.TOO_LARGE,
                f"decoding this image takes up to {_mib(cost)}; the server decodes at most "
                f"{_mib(self.limit_bytes)} at once (send a smaller image, or a JPEG)",
            )
        with self._lock:
            if self._held + cost > self.limit_bytes:
                self.refused += 1
                raise DecodeBudgetExceeded(
                    f"the server is decoding other images ({_mib(self._held)} of "
                    f"{_mib(self.limit_bytes)} in use; this one needs up to {_mib(cost)})"
                )
            self._held += cost
        try:
            yield
        finally:
            with self._lock:
                self._held -= cost


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


_BYTES_PER_PIXEL = {
    "1": 2,
    "L": 2,
    "RGB": 5,
    "CMYK": 8,
    "YCbCr": 8,
    **dict.fromkeys(("I;16", "I;16B", "I;16L", "I", "F"), 13),
}
"""Peak bytes per pixel of decoding an image in each mode, then reducing it, measured with
Pillow 13 on 40 MP images and rounded up (docs/reliability.md): Pillow keeps RGB in 4 bytes a
pixel; palette, RGBA and 16-bit grey are converted once at full size before reducing (9 bytes
measured); grey in 16 or 32 bits is stretched in floats (26 bytes measured at full size);
modes not listed: :data:`_DEFAULT_BYTES_PER_PIXEL`."""
_DEFAULT_BYTES_PER_PIXEL = 10
_FORMAT_BYTES_PER_PIXEL = {"WEBP": 16}
"""Formats whose decoder needs a buffer of its own beside Pillow's (WebP: 15 measured)."""
_DECODER_BYTES = 4 * 2**20
"""Fixed working memory of one decode (decoder state, the reduced image)."""


def decode_cost(img: Image.Image, decode_side: int | None = None) -> int:
    """Worst-case bytes that decoding the opened ``img`` holds at its peak: its pixels (after
    ``draft``, which shrinks a JPEG before decoding) x the bytes a pixel of its format and
    mode takes; twice that when the image is converted at full size (not reduced for
    ``decode_side``: RGBA measured 19 bytes a pixel)."""
    width, height = img.size
    per_pixel = _FORMAT_BYTES_PER_PIXEL.get(
        img.format or "", _BYTES_PER_PIXEL.get(img.mode, _DEFAULT_BYTES_PER_PIXEL)
    )
    full_size = decode_side is None or min(width, height) // decode_side < 2
    return width * height * per_pixel * (2 if full_size else 1) + _DECODER_BYTES


@dataclass(frozen=True)
class AcceptedImage:
    """A fully decoded RGB image and the format it came in."""

    image: Image.Image
    format: str
    ext: str


def sniff_format(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The accepted format of ``data`` from its header, or :class:`InvalidImageError`.

    Only accepted formats are parsed; the header of any other is matched against Pillow's
    signatures without opening it, to tell an unaccepted image format from a non-image.
    """
    if not data:
        raise InvalidImageError(RejectReason.EMPTY, "the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as probe:
            fmt = probe.format or ""
    except Image.DecompressionBombError:
        raise InvalidImageError(
            RejectReason.TOO_LARGE, _too_many_pixels(None, max_pixels)
        ) from None
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
    decode_side: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Decode untrusted bytes into an RGB image (EXIF orientation applied).

    ``decode_side``: decode at the size a model needs, not at full size: JPEG is decoded at
    a reduced scale (1/2, 1/4 or 1/8, ``draft``) and other formats are reduced right after
    decoding, before any conversion, so that the short side stays at least ``decode_side``
    (``None``: full size, for images that are stored). ``budget``: the decode reserves its
    worst-case bytes (:func:`decode_cost`) there first (:class:`DecodeBudgetExceeded`).

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
                raise InvalidImageError(RejectReason.TOO_LARGE, _too_many_pixels(img, max_pixels))
            if min(width, height) < min_side:
                raise InvalidImageError(
                    RejectReason.TOO_SMALL,
                    f"image is {width}x{height}; each side must be at least {min_side} px",
                )
            if decode_side is not None and img.format == "JPEG":
                img.draft(None, (decode_side, decode_side))
            with (
                budget.reserve(decode_cost(img, decode_side))
                if budget
                else contextlib.nullcontext()
            ):
                img.load()
                return to_rgb(oriented(img, decode_side))
    except (InvalidImageError, DecodeBudgetExceeded):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(
            RejectReason.TOO_LARGE, _too_many_pixels(None, max_pixels)
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            RejectReason.NOT_AN_IMAGE, "the file is not a supported image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImageError(
            RejectReason.TRUNCATED, f"the image is truncated or corrupt ({exc})"
        ) from None


def _too_many_pixels(img: Image.Image | None, max_pixels: int) -> str:
    """The refusal of an image over the pixel limit, quoting the configured limit."""
    if img is None:  # refused by Pillow's own guard before its size was known
        return f"image is too large: more than {max_pixels:,} pixels (the limit)"
    width, height = img.size
    return f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"


def accept_image(
    data: bytes, limits: ImageLimits | None = None, budget: DecodeBudget | None = None
) -> AcceptedImage:
    """The acceptance rule: byte limit, header sniff, decode within the pixel limits (at the
    size ``limits.decode_side`` asks for; within ``budget`` when one is given).

    Every failure, including decoders failing in unexpected ways on hostile input, is an
    :class:`InvalidImageError`.
    """
    limits = limits or ImageLimits()
    if not data:
        raise InvalidImageError(RejectReason.EMPTY, "the file is empty")
    if limits.max_bytes is not None and len(data) > limits.max_bytes:
        raise InvalidImageError(RejectReason.TOO_LARGE, f"more than {limits.max_bytes:,} bytes")
    fmt = sniff_format(data, limits.max_pixels)
    try:
        img = decode_image(
            data,
            max_pixels=limits.max_pixels,
            min_side=limits.min_side,
            decode_side=limits.decode_side,
            budget=budget,
        )
    except (InvalidImageError, DecodeBudgetExceeded):
        raise
    except Exception as exc:  # malformed files can make decoders fail in odd ways
        raise InvalidImageError(RejectReason.TRUNCATED, _corrupt(exc)) from None
    return AcceptedImage(img, fmt, FORMAT_EXTENSIONS[fmt])


def _corrupt(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"the image is corrupt ({type(exc).__name__}{': ' + first if first else ''})"


@dataclass(frozen=True)
class CanonicalImage:
    """What is stored for an accepted image: ``data`` in ``format`` (extension ``ext``).

    ``trailing_bytes`` were cut after the image's end marker; ``reencoded`` says the decoded
    pixels were re-encoded losslessly as PNG (formats whose end cannot be found reliably);
    ``metadata_bytes`` of comments and metadata were cut (``strip_metadata``).
    """

    data: bytes
    format: str
    ext: str
    trailing_bytes: int = 0
    reencoded: bool = False
    metadata_bytes: int = 0

    @property
    def changed(self) -> bool:
        return self.reencoded or self.trailing_bytes > 0 or self.metadata_bytes > 0


def canonical_image(
    data: bytes,
    accepted: AcceptedImage,
    *,
    strip_metadata: bool = False,
    budget: DecodeBudget | None = None,
) -> CanonicalImage:
    """The one rule for the bytes that are stored of an accepted image (``data``, accepted as
    ``accepted`` by :func:`accept_image`).

    * JPEG, PNG, WebP and GIF: the bytes up to the format's end (EOI marker, IEND chunk, RIFF
      size, GIF trailer), found by walking the file's structure (so an EOI inside an embedded
      thumbnail does not count). Ordinary files end there and are kept byte-identical; bytes
      after the end (an appended ZIP or HTML payload) are cut. The cut bytes must decode again.
    * BMP and TIFF (their end is not well defined) and any file whose end is not found: the
      decoded pixels re-encoded losslessly as PNG.
    * ``strip_metadata`` (images users send: feedback): JPEG and PNG also lose their comment
      and metadata segments (COM, EXIF, XMP, text chunks: a ``<script>`` in a comment is not
      stored); other formats, and a file whose pixels change without them (an EXIF
      rotation), are re-encoded. The second decode counts against ``budget``.
    """
    finder = END_FINDERS.get(accepted.format)
    end = finder(data) if finder is not None else None
    stripper = METADATA_STRIPPERS.get(accepted.format) if strip_metadata else None
    kept = data[:end] if end is not None else None
    if kept is not None and strip_metadata:
        kept = stripper(kept) if stripper is not None else None
    if kept is not None:
        if kept == data:
            return CanonicalImage(data, accepted.format, accepted.ext)
        pixels = accepted.image.width * accepted.image.height
        with contextlib.suppress(InvalidImageError):
            again = decode_image(kept, max_pixels=pixels, min_side=1, budget=budget)
            if again.size == accepted.image.size and again.tobytes() == accepted.image.tobytes():
                trailing = len(data) - (end or 0)
                return CanonicalImage(
                    kept,
                    accepted.format,
                    accepted.ext,
                    trailing_bytes=trailing,
                    metadata_bytes=len(data) - trailing - len(kept),
                )
    buf = io.BytesIO()
    accepted.image.save(buf, format="PNG", optimize=False)
    return CanonicalImage(buf.getvalue(), "PNG", FORMAT_EXTENSIONS["PNG"], reencoded=True)
