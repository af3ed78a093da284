"""Memory-bounded decoding (dandelion_lib.core.images): reduce-on-load at the size the model
needs, the decode budget, and the pixel limit as configured; on real encoded bytes."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from dandelion_lib.core.features import FeatureSpec, to_model_input
from dandelion_lib.core.images import (
    DecodeBudget,
    DecodeBudgetExceeded,
    ImageLimits,
    InvalidImageError,
    RejectReason,
    accept_image,
    decode_cost,
    decode_image,
)

SPEC = FeatureSpec()


def textured(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Smooth colour gradients plus fine noise: the resize has real detail to filter."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    rgb = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P")])
def test_reduced_decoding_gives_the_model_the_input_a_full_decode_gives(
    fmt: str, mode: str
) -> None:
    data = encode(textured((3000, 2000), mode), fmt)
    reduced = decode_image(data, decode_side=SPEC.decode_side)
    full = decode_image(data)
    assert full.size == (3000, 2000)
    assert SPEC.decode_side <= min(reduced.size) < 2 * SPEC.decode_side
    assert reduced.mode == "RGB"
    diff = np.abs(to_model_input(reduced, SPEC) - to_model_input(full, SPEC))
    assert float(diff.mean()) < 2.0, float(diff.mean())  # of 255; a resize artefact, not content


def test_reduced_decoding_keeps_the_exif_orientation() -> None:
    img = textured((1600, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(img, "JPEG", exif=exif.tobytes())
    reduced = decode_image(data, decode_side=352)
    full = decode_image(data)
    assert full.size == (800, 1600)
    assert reduced.width < reduced.height  # portrait, like the full decode
    assert reduced.width >= 352


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [2000, 20_000])  # under and over Pillow's own guard
def test_the_pixel_limit_message_quotes_the_configured_limit(side: int) -> None:
    with pytest.raises(InvalidImageError) as info:
        accept_image(png_header(side, side), ImageLimits(max_pixels=1_000_000))
    assert info.value.reason is RejectReason.TOO_LARGE
    assert "1,000,000" in str(info.value)
    assert "178,956,970" not in str(info.value) and "178956970" not in str(info.value)


def test_the_default_pixel_limit_follows_from_the_model_input() -> None:
    limits = ImageLimits()
    side = 2 * 8 * SPEC.image_size  # twice the input after JPEG's largest reduction (1/8)
    assert side * side <= limits.max_pixels < 1.05 * side * side


def test_a_jpeg_costs_its_reduced_size_and_a_png_its_full_size() -> None:
    img = textured((2816, 2816))
    jpeg = Image.open(io.BytesIO(encode(img, "JPEG")))
    jpeg.draft(None, (704, 704))
    png = Image.open(io.BytesIO(encode(img, "PNG")))
    assert decode_cost(jpeg, 704) < 16 * 2**20
    assert decode_cost(png, 704) >= 2816 * 2816 * 4


def test_the_decode_budget_refuses_what_does_not_fit_beside_decodes_in_flight() -> None:
    data = encode(textured((2000, 2000)), "PNG")
    probe = Image.open(io.BytesIO(data))
    cost = decode_cost(probe, SPEC.decode_side)
    budget = DecodeBudget(int(cost * 1.5))
    limits = ImageLimits(decode_side=SPEC.decode_side)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget.reserve(cost):
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert holding.wait(30)
        with pytest.raises(DecodeBudgetExceeded):
            accept_image(data, limits, budget)
        assert budget.refused == 1
    finally:
        release.set()
        worker.join(30)
    assert budget.held == 0
    assert accept_image(data, limits, budget).image.size[0] >= SPEC.decode_side
    assert budget.held == 0

    with pytest.raises(InvalidImageError) as info:  # never fits: too large, not busy
        accept_image(data, limits, DecodeBudget(cost // 2))
    assert info.value.reason is RejectReason.TOO_LARGE
    assert "MiB" in str(info.value)
