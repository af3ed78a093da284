"""Image acceptance (dandelion_lib.core.images): formats, limits and reason codes, on real bytes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from dandelion_lib.core.config import Settings
from dandelion_lib.core.images import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    FORMAT_EXTENSIONS,
    ImageLimits,
    InvalidImageError,
    RejectReason,
    accept_image,
    canonical_image,
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
        defaults.images.max_image_pixels,
        defaults.images.min_image_side,
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


# --- canonical bytes: what is stored of an accepted image ----------------------------------
def zip_payload() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("payload.html", "<html><script>alert(1)</script></html>")
    return buf.getvalue()


def textured(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A photo-like image (noise), so the entropy-coded data has stuffed bytes and markers."""
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_with_thumbnail() -> bytes:
    """A JPEG whose EXIF block holds a JPEG thumbnail (its own EOI comes first)."""
    thumb = encode(textured((16, 16)), "JPEG")
    exif = Image.Exif()
    exif[0x010F] = "camera"
    app1_body = b"Exif\x00\x00" + exif.tobytes() + thumb
    main = encode(textured(), "JPEG")
    app1 = b"\xff\xe1" + (len(app1_body) + 2).to_bytes(2, "big") + app1_body
    return main[:2] + app1 + main[2:]


def save(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


ORDINARY = {
    "jpeg": lambda: save(textured(), "JPEG", quality=90),
    "jpeg-progressive-restart": lambda: save(
        textured(), "JPEG", progressive=True, restart_marker_blocks=1
    ),
    "jpeg-exif-thumbnail": jpeg_with_thumbnail,
    "png": lambda: save(textured(), "PNG"),
    "webp": lambda: save(textured(), "WEBP", quality=80),
    "webp-odd-size": lambda: save(textured((33, 35)), "WEBP", lossless=True),
    "gif": lambda: save(textured().quantize(64), "GIF"),
    "gif-animated": lambda: save(
        textured().quantize(64),
        "GIF",
        save_all=True,
        append_images=[textured().rotate(90).quantize(64)],
    ),
}


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_files_are_stored_byte_identical(name: str) -> None:
    data = ORDINARY[name]()
    canonical = canonical_image(data, accept_image(data))
    assert canonical.data == data and not canonical.changed


def test_reference_photos_are_stored_byte_identical(greenr_dir: Path) -> None:
    for path in sorted(greenr_dir.glob("*/*.jpg"))[::20]:
        data = path.read_bytes()
        assert canonical_image(data, accept_image(data)).data == data, path


@pytest.mark.parametrize("name", sorted(ORDINARY))
@pytest.mark.parametrize("payload", ["zip", "html"])
def test_data_after_the_image_is_cut(name: str, payload: str) -> None:
    data = ORDINARY[name]()
    extra = zip_payload() if payload == "zip" else b"<html><script>alert(1)</script></html>"
    polyglot = data + extra
    if payload == "zip":
        assert zipfile.is_zipfile(io.BytesIO(polyglot))  # really a polyglot
    accepted = accept_image(polyglot)
    canonical = canonical_image(polyglot, accepted)
    assert canonical.data == data
    assert canonical.trailing_bytes == len(extra)
    assert (canonical.format, canonical.ext) == (accepted.format, accepted.ext)
    assert not zipfile.is_zipfile(io.BytesIO(canonical.data))


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_formats_without_a_reliable_end_are_reencoded_losslessly(fmt: str) -> None:
    data = save(textured(), fmt) + zip_payload()
    accepted = accept_image(data)
    canonical = canonical_image(data, accepted)
    assert canonical.reencoded and (canonical.format, canonical.ext) == ("PNG", "png")
    again = accept_image(canonical.data)
    assert again.image.tobytes() == accepted.image.tobytes()
    assert canonical_image(canonical.data, again).data == canonical.data  # a fixed point


SCRIPT = b"<script>alert(1)</script>"


def jpeg_with_metadata() -> bytes:
    """A JPEG carrying a comment (COM) with a script, an XMP packet and an EXIF block."""
    main = save(textured(), "JPEG", quality=90, comment=SCRIPT)
    exif = Image.Exif()
    exif[0x010E] = SCRIPT.decode()  # ImageDescription
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>" + SCRIPT + b"</x:xmpmeta>"
    segments = b"".join(
        marker + (len(body) + 2).to_bytes(2, "big") + body
        for marker, body in [(b"\xff\xe1", b"Exif\x00\x00" + exif.tobytes()), (b"\xff\xe1", xmp)]
    )
    return main[:2] + segments + main[2:]


def png_with_metadata() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SCRIPT.decode())
    info.add_itxt("XML:com.adobe.xmp", SCRIPT.decode(), zip=True)
    return save(textured(), "PNG", pnginfo=info)


@pytest.mark.parametrize("make", [jpeg_with_metadata, png_with_metadata])
def test_stored_user_images_lose_comments_and_metadata_not_pixels(make: Any) -> None:
    data = make()
    assert SCRIPT in data or b"alert" in data
    accepted = accept_image(data)
    canonical = canonical_image(data, accepted, strip_metadata=True)
    assert b"script" not in canonical.data and b"alert" not in canonical.data
    assert (canonical.format, canonical.reencoded) == (accepted.format, False)
    assert canonical.metadata_bytes > 0 and canonical.changed
    assert accept_image(canonical.data).image.tobytes() == accepted.image.tobytes()
    assert canonical_image(canonical.data, accepted, strip_metadata=True).data == canonical.data


def test_a_rotation_or_a_format_without_a_stripper_is_reencoded() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # the rotation would be lost with the EXIF block
    exif[0x010E] = SCRIPT.decode()
    rotated = save(textured(), "JPEG", exif=exif.tobytes())
    gif = save(textured().quantize(64), "GIF", comment=SCRIPT)
    for data in (rotated, gif):
        accepted = accept_image(data)
        canonical = canonical_image(data, accepted, strip_metadata=True)
        assert canonical.reencoded and canonical.format == "PNG"
        assert b"script" not in canonical.data
        assert accept_image(canonical.data).image.tobytes() == accepted.image.tobytes()


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_stripping_keeps_ordinary_files_decodable_and_identical_in_pixels(name: str) -> None:
    data = ORDINARY[name]()
    accepted = accept_image(data)
    canonical = canonical_image(data, accepted, strip_metadata=True)
    assert accept_image(canonical.data).image.tobytes() == accepted.image.tobytes()
