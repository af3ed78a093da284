"""Image acceptance (dandelion_lib.images): formats, limits and reason codes, on real bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dandelion_lib.config import Settings
from dandelion_lib.images import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    FORMAT_EXTENSIONS,
    ImageLimits,
    InvalidImageError,
    RejectReason,
    accept_image,
    decode_image,
    sniff_format,
)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def photo(size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, (200, 180, 20))


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_is_accepted_with_its_extension(fmt: str) -> None:
    accepted = accept_image(encode(photo(), fmt))
    assert accepted.format == fmt
    assert accepted.ext == FORMAT_EXTENSIONS[fmt]
    assert accepted.image.mode == "RGB" and accepted.image.size == (64, 48)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", RejectReason.EMPTY),
        (b"<html>not an image</html>", RejectReason.NOT_AN_IMAGE),
        (encode(photo(), "ICO"), RejectReason.UNSUPPORTED_FORMAT),
        (encode(photo(), "JPEG")[:200], RejectReason.TRUNCATED),
        (encode(photo((20, 64)), "PNG"), RejectReason.TOO_SMALL),
    ],
    ids=["empty", "html", "ico", "truncated", "too-small"],
)
def test_refusals_carry_their_reason(data: bytes, reason: RejectReason) -> None:
    with pytest.raises(InvalidImageError) as info:
        accept_image(data)
    assert info.value.reason is reason
    assert str(info.value)  # a user-facing sentence


def test_limits_come_from_settings() -> None:
    settings = Settings(max_image_pixels=1000, min_image_side=8, max_download_bytes=10_000)
    limits = ImageLimits.from_settings(settings, with_bytes=True)
    assert limits == ImageLimits(max_pixels=1000, min_side=8, max_bytes=10_000)
    assert ImageLimits.from_settings(settings).max_bytes is None
    defaults = Settings()
    assert (
        defaults.max_image_pixels,
        defaults.min_image_side,
    ) == (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE)
    with pytest.raises(InvalidImageError) as info:
        accept_image(encode(photo(), "PNG"), limits)  # 64x48 > 1000 pixels
    assert info.value.reason is RejectReason.TOO_LARGE
    with pytest.raises(InvalidImageError) as info:
        accept_image(b"x" * 10_001, limits)
    assert info.value.reason is RejectReason.TOO_LARGE


def test_reasons_map_to_http_problems() -> None:
    table = {r.value: (r.status, r.problem) for r in RejectReason}
    assert table == {
        "empty": (400, "empty-image"),
        "not_an_image": (415, "unsupported-image"),
        "unsupported_format": (415, "unsupported-image"),
        "truncated": (422, "corrupt-image"),
        "too_large": (413, "image-too-large"),
        "too_small": (422, "image-too-small"),
    }
    assert all(r.description for r in RejectReason)
    assert InvalidImageError("too_small", "x").reason is RejectReason.TOO_SMALL
    with pytest.raises(ValueError, match="unknown"):
        InvalidImageError("no_such_reason", "x")


def test_sniff_reads_headers_only() -> None:
    assert sniff_format(encode(photo(), "WEBP")) == "WEBP"
    with pytest.raises(InvalidImageError) as info:
        sniff_format(b"%PDF-1.4\n" + b"0" * 100)
    assert info.value.reason in (RejectReason.UNSUPPORTED_FORMAT, RejectReason.NOT_AN_IMAGE)


def test_decode_applies_exif_orientation_and_flattens_alpha() -> None:
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img = decode_image(encode(rgba, "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    photo((64, 40)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (40, 64)
