"""A corpus of hostile and unusual inputs, generated here, sent to the real API process.

Every case must get either a 4xx ``application/problem+json`` answer (with the expected
status and problem code where the outcome is certain) or a correct prediction (equal to the
same model version run in-process on the same bytes). Never a 5xx, never a stack trace.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import ApiServer
from tests.conftest import GREENR

PROBLEM = "application/problem+json"
OK = 200


@cache
def photo() -> Image.Image:
    return Image.open(GREENR / "dandelion" / "00000005.jpg").convert("RGB")


@cache
def photo_jpeg() -> bytes:
    return (GREENR / "dandelion" / "00000005.jpg").read_bytes()


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_bad_crc() -> bytes:
    data = bytearray(encode(photo().resize((64, 64)), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def sixty_megapixels() -> bytes:
    return encode(Image.new("1", (7800, 7800)), "PNG")  # 60.8 MP, a few kB compressed


def cmyk_jpeg() -> bytes:
    return encode(photo().convert("CMYK"), "JPEG", quality=90)


def png16() -> bytes:
    arr = (np.asarray(photo().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return encode(img, "PNG")


def animated_gif() -> bytes:
    frames = [
        photo().quantize(64),
        photo().rotate(90).quantize(64),
        photo().rotate(180).quantize(64),
    ]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def rgba_png() -> bytes:
    img = photo().convert("RGBA")
    alpha = Image.linear_gradient("L").resize(img.size)
    img.putalpha(alpha)
    return encode(img, "PNG")


def palette_transparent_png() -> bytes:
    img = photo().quantize(32)
    img.info["transparency"] = 0
    return encode(img, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return encode(photo(), "JPEG", exif=exif.tobytes())


def broken_exif_jpeg() -> bytes:
    data = encode(photo(), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\x00\x00MM\x00*\x00\x00\x00\xff\xff\xff"
    return data[:2] + app1 + data[2:]


def corrupt_scan_jpeg() -> bytes:
    data = bytearray(photo_jpeg())
    for i in range(len(data) // 2, len(data) // 2 + 400, 7):
        data[i] ^= 0x5A
    return bytes(data)


@dataclass
class Case:
    id: str
    body: Callable[[], dict[str, Any]]  # httpx request kwargs
    expect: int | None  # exact status; None = any 4xx problem or a correct prediction
    code: str | None = None  # expected problem code
    path: str = "/predict"
    method: str = "POST"
    image: Callable[[], bytes] | None = None  # bytes to check a 200 answer against
    batch_check: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)


def raw(data: Callable[[], bytes], ctype: str = "image/jpeg") -> Callable[[], dict[str, Any]]:
    return lambda: {"content": data(), "headers": {"content-type": ctype}}


def part(
    data: Callable[[], bytes], name: str = "x.jpg", field_name: str = "file"
) -> Callable[[], dict[str, Any]]:
    return lambda: {"files": {field_name: (name, data(), "application/octet-stream")}}


def good(case_id: str, data: Callable[[], bytes], *, as_raw: bool = False) -> Case:
    body = raw(data) if as_raw else part(data)
    return Case(case_id, body, OK, image=data)


def bad(
    case_id: str, data: Callable[[], bytes], status: int | None, code: str | None = None
) -> Case:
    return Case(case_id, part(data), status, code)


def multipart_without_boundary() -> dict[str, Any]:
    return {
        "content": b"--x\r\n\r\nabc\r\n--x--\r\n",
        "headers": {"content-type": "multipart/form-data"},
    }


def garbage_multipart() -> dict[str, Any]:
    return {
        "content": b'--abc\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"\x00" * 50,
        "headers": {"content-type": "multipart/form-data; boundary=abc"},
    }


def oversize_raw() -> dict[str, Any]:
    return {
        "content": b"\xff\xd8\xff" + b"\x00" * (11 * 1024 * 1024),
        "headers": {"content-type": "image/jpeg"},
    }


def oversize_multipart() -> dict[str, Any]:
    return {"files": {"file": ("big.jpg", b"\xff\xd8\xff" + b"\x01" * (11 * 1024 * 1024))}}


def two_files() -> dict[str, Any]:
    return {"files": [("file", ("a.jpg", photo_jpeg())), ("file", ("b.jpg", photo_jpeg()))]}


def text_instead_of_file() -> dict[str, Any]:
    return {"data": {"file": "I am text"}, "files": {"other": ("o.txt", b"x")}}


def many_batch_files() -> dict[str, Any]:
    return {"files": [("files", (f"{i}.jpg", photo_jpeg())) for i in range(33)]}


def many_form_fields() -> dict[str, Any]:
    return {"data": {f"field{i}": "x" for i in range(60)}, "files": {"file": ("a.jpg", b"x")}}


def too_many_part_headers() -> dict[str, Any]:
    headers = "".join(f"X-Extra-{i}: {i}\r\n" for i in range(10))
    body = (
        b"--abc\r\n"
        + f'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n{headers}\r\n'.encode()
        + photo_jpeg()
        + b"\r\n--abc--\r\n"
    )
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=abc"}}


def batch_one_long_filename() -> dict[str, Any]:
    return {
        "files": [("files", ("a.jpg", photo_jpeg())), ("files", ("b" * 300 + ".jpg", photo_jpeg()))]
    }


def check_one_long_filename(body: dict[str, Any]) -> None:
    assert body["succeeded"] == 1 and body["failed"] == 1
    error = body["results"][1]["error"]
    assert error["code"] == "filename-too-long" and "filename too long" in error["detail"]


def all_bad_batch() -> dict[str, Any]:
    return {
        "files": [("files", ("a.svg", SVG)), ("files", ("b.txt", b"")), ("files", ("c", b"GIF89a"))]
    }


def check_all_bad(body: dict[str, Any]) -> None:
    assert body["succeeded"] == 0 and body["failed"] == 3
    assert [r["error"]["status"] for r in body["results"]] == [415, 400, 422]


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="300"><rect width="300" height="300" fill="yellow"/></svg>'
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"

CASES: list[Case] = [
    # --- valid images in every common shape: a correct prediction ------------------------
    good("jpeg-multipart", photo_jpeg),
    good("jpeg-raw", photo_jpeg, as_raw=True),
    Case("jpeg-octet-stream", raw(photo_jpeg, "application/octet-stream"), OK, image=photo_jpeg),
    Case("jpeg-labelled-png", raw(photo_jpeg, "image/png"), OK, image=photo_jpeg),
    good("png-rgb", lambda: encode(photo(), "PNG")),
    good("png-alpha", rgba_png),
    good("png-gray-alpha", lambda: encode(photo().convert("LA"), "PNG")),
    good("png-palette-transparency", palette_transparent_png),
    good("png-16bit", png16),
    good("png-bilevel", lambda: encode(photo().convert("1"), "PNG")),
    good("jpeg-grayscale", lambda: encode(photo().convert("L"), "JPEG")),
    good("jpeg-cmyk", cmyk_jpeg),
    good("jpeg-progressive", lambda: encode(photo(), "JPEG", progressive=True)),
    good("jpeg-exif-rotated", exif_rotated_jpeg),
    good("jpeg-broken-exif", broken_exif_jpeg),
    good("jpeg-trailing-garbage", lambda: photo_jpeg() + b"<html>" * 100),
    good("gif-animated", animated_gif),
    good("webp-lossy", lambda: encode(photo(), "WEBP", quality=80)),
    good("webp-lossless-alpha", lambda: encode(photo().convert("RGBA"), "WEBP", lossless=True)),
    good("bmp", lambda: encode(photo(), "BMP")),
    good("tiff", lambda: encode(photo(), "TIFF")),
    Case(
        "unicode-filename",
        lambda: {"files": {"file": ("löwenzahn 🌼.jpg", photo_jpeg(), "image/jpeg")}},
        OK,
        image=photo_jpeg,
    ),
    # --- broken or hostile image bytes --------------------------------------------------
    bad(
        "jpeg-truncated-half", lambda: photo_jpeg()[: len(photo_jpeg()) // 2], 422, "corrupt-image"
    ),
    bad("jpeg-header-only", lambda: photo_jpeg()[:300], 422, "corrupt-image"),
    bad("jpeg-soi-only", lambda: b"\xff\xd8\xff\xe0", 422, "corrupt-image"),
    Case("jpeg-corrupt-scan", part(corrupt_scan_jpeg), None, image=corrupt_scan_jpeg),
    bad("png-bad-crc", png_bad_crc, 422, "corrupt-image"),
    bad("png-60-megapixels", sixty_megapixels, 413, "image-too-large"),
    bad("png-bomb-header", lambda: png_claiming(100_000, 100_000), 413, "image-too-large"),
    bad("gif-bomb-header", lambda: gif_claiming(65_535, 65_535), 413, "image-too-large"),
    bad("png-8x8", lambda: encode(photo().resize((8, 8)), "PNG"), 422, "image-too-small"),
    bad(
        "png-1x4000-strip",
        lambda: encode(Image.new("RGB", (4000, 1)), "PNG"),
        422,
        "image-too-small",
    ),
    bad("svg", lambda: SVG, 415, "unsupported-image"),
    bad("html", lambda: HTML, 415, "unsupported-image"),
    bad("pdf", lambda: PDF, 415, "unsupported-image"),
    bad("eps-postscript", lambda: EPS, 415, "unsupported-image"),
    bad("ico", lambda: encode(photo().resize((64, 64)), "ICO"), 415, "unsupported-image"),
    bad("tga", lambda: encode(photo(), "TGA"), 415, "unsupported-image"),
    bad("gif-header-then-html", lambda: b"GIF89a" + HTML, 422, "corrupt-image"),
    bad("random-bytes", lambda: np.random.default_rng(0).bytes(5000), 415, "unsupported-image"),
    bad("zero-byte-file", lambda: b"", 400, "empty-image"),
    Case("zero-byte-raw-body", raw(lambda: b""), 400, "empty-image"),
    # --- request framing ----------------------------------------------------------------
    Case("no-body-no-content-type", lambda: {}, 400, "empty-body"),
    Case("wrong-field-name", part(photo_jpeg, field_name="image"), 400, "missing-file"),
    Case("text-field-not-file", text_instead_of_file, 400, "not-a-file"),
    Case("two-files-on-predict", two_files, 400, "too-many-files"),
    Case("content-type-text-plain", raw(photo_jpeg, "text/plain"), 415, "unsupported-media-type"),
    Case(
        "content-type-json", lambda: {"json": {"image": "aGVsbG8="}}, 415, "unsupported-media-type"
    ),
    Case(
        "content-type-form-urlencoded",
        lambda: {"data": {"file": "abc"}},
        415,
        "unsupported-media-type",
    ),
    Case(
        "filename-over-255-chars",
        part(photo_jpeg, name="a" * 300 + ".jpg"),
        400,
        "filename-too-long",
    ),
    Case(
        "filename-over-part-header-limit",
        part(photo_jpeg, name="a" * 5000 + ".jpg"),
        400,
        "filename-too-long",
    ),
    Case("too-many-parts", many_form_fields, 413, "too-many-parts"),
    Case("too-many-part-headers", too_many_part_headers, 400, "too-many-part-headers"),
    Case("multipart-without-boundary", multipart_without_boundary, 400),
    Case("multipart-garbage", garbage_multipart, 400),
    Case("oversize-raw-body", oversize_raw, 413, "body-too-large"),
    Case("oversize-multipart-body", oversize_multipart, 413, "body-too-large"),
    Case("get-predict", lambda: {}, 405, "method-not-allowed", method="GET"),
    Case("put-predict", raw(photo_jpeg), 405, "method-not-allowed", method="PUT"),
    # --- batch --------------------------------------------------------------------------
    Case("batch-too-many-files", many_batch_files, 413, "too-many-files", path="/predict/batch"),
    Case("batch-raw-body", raw(photo_jpeg), 415, "unsupported-media-type", path="/predict/batch"),
    Case("batch-wrong-field", part(photo_jpeg), 400, "missing-file", path="/predict/batch"),
    Case("batch-empty-body", lambda: {}, 400, "empty-body", path="/predict/batch"),
    Case("batch-all-bad", all_bad_batch, OK, path="/predict/batch", batch_check=check_all_bad),
    Case(
        "batch-one-long-filename",
        batch_one_long_filename,
        OK,
        path="/predict/batch",
        batch_check=check_one_long_filename,
    ),
]


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, api_server: ApiServer) -> None:
    with api_server.client() as c:
        r = c.request(case.method, case.path, **case.body())
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    if case.expect is not None:
        assert r.status_code == case.expect, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith(PROBLEM), r.headers
        problem = r.json()
        assert {"type", "title", "status", "detail", "code"} <= set(problem)
        assert problem["status"] == r.status_code
        assert problem["type"] == f"urn:dandelion:problem:{problem['code']}"
        if case.code:
            assert problem["code"] == case.code, problem
        if case.code == "filename-too-long":
            assert "filename too long" in problem["detail"], problem
        return
    assert r.status_code == OK
    body = r.json()
    if case.batch_check is not None:
        case.batch_check(body)
        return
    assert case.image is not None
    (expected,) = api_server.registry.predictor(body["model"]["version"]).predict_bytes(
        [case.image()]
    )
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)


def test_invalid_inputs_are_counted_by_reason(api_server: ApiServer) -> None:
    with api_server.client() as c:
        c.post("/predict", content=SVG, headers={"content-type": "image/svg+xml"})
        text = c.get("/metrics").text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith('dandelion_invalid_inputs_total{reason="unsupported-image"}')
    )
    assert float(line.split()[-1]) >= 1


def test_sample_of_the_greenr_images_all_predict(api_server: ApiServer) -> None:
    """Sanity: the real photos of the dataset are never rejected."""
    paths = sorted(Path(GREENR).glob("*/*.jpg"))[::25]
    with api_server.client() as c:
        for p in paths:
            assert c.post("/predict", files={"file": (p.name, p.read_bytes())}).status_code == OK
