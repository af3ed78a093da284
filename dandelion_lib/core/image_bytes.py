"""The structure of encoded image files, walked byte by byte without decoding: where an image
ends (:data:`END_FINDERS`; bytes after it are no part of the image), and the same bytes
without comments and metadata (:data:`METADATA_STRIPPERS`).

:func:`dandelion_lib.core.images.canonical_image` uses it to decide which bytes are stored.
"""

from __future__ import annotations

from collections.abc import Callable


def _jpeg_end(data: bytes) -> int | None:
    """Offset just after the EOI marker that ends the first image, walking the segments."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while (segment := _jpeg_segment(data, i)) is not None:
        _, marker, i = segment
        if marker == 0xD9:  # EOI
            return i
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


END_FINDERS: dict[str, Callable[[bytes], int | None]] = {
    "JPEG": _jpeg_end,
    "PNG": _png_end,
    "WEBP": _webp_end,
    "GIF": _gif_end,
}


# --- metadata ---------------------------------------------------------------------------------
_JPEG_KEPT_APP = ((0xE0, b"JFIF\x00"), (0xE2, b"ICC_PROFILE\x00"), (0xEE, b"Adobe"))
"""Application segments that decoding needs (JFIF, the colour profile, Adobe's colour
transform); every other APPn (EXIF, XMP, ...) and every comment (COM) is metadata."""


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """``data`` (a JPEG ending at its EOI) without comment and metadata segments, or ``None``
    when its structure cannot be walked."""
    if data[:2] != b"\xff\xd8":
        return None
    out, i = [data[:2]], 2
    while (segment := _jpeg_segment(data, i)) is not None:
        start, marker, end = segment
        if not _jpeg_metadata(marker, data[start:end]):
            out.append(data[start:end])
        if marker == 0xD9:  # EOI
            return b"".join(out)
        i = end
    return None


def _jpeg_segment(data: bytes, i: int) -> tuple[int, int, int] | None:
    """(start, marker, end) of the marker segment at ``i``; an SOS segment ends with its
    entropy-coded data. ``None`` when the bytes there are not a segment."""
    n, start = len(data), i
    if i >= n or data[i] != 0xFF:
        return None
    while i < n and data[i] == 0xFF:  # fill bytes
        i += 1
    if i >= n:
        return None
    marker = data[i]
    i += 1
    if marker == 0xD9 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # EOI, TEM, RSTn
        return start, marker, i
    length = int.from_bytes(data[i : i + 2], "big") if i + 2 <= n else 0
    if length < 2 or i + length > n:
        return None
    end: int | None = i + length
    if marker == 0xDA:  # SOS: entropy-coded data follows
        end = _jpeg_scan_end(data, i + length)
    return (start, marker, end) if end is not None else None


def _jpeg_metadata(marker: int, segment: bytes) -> bool:
    """A comment (COM), or an application segment decoding does not need."""
    if marker == 0xFE:
        return True
    if not 0xE0 <= marker <= 0xEF:
        return False
    payload = segment[segment.index(marker.to_bytes(1, "big")) + 3 :]
    return not any(marker == m and payload.startswith(p) for m, p in _JPEG_KEPT_APP)


_PNG_KEPT = frozenset(
    b"IHDR PLTE IDAT IEND tRNS cHRM gAMA iCCP sBIT sRGB cICP bKGD pHYs acTL fcTL fdAT".split()
)
"""Chunks that carry the image; text (tEXt, zTXt, iTXt), EXIF, times and any other chunk are
metadata."""


def strip_png_metadata(data: bytes) -> bytes | None:
    """``data`` (a PNG ending at its IEND) with only the chunks of :data:`_PNG_KEPT`, or
    ``None`` when its structure cannot be walked."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    i, n = len(_PNG_SIGNATURE), len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n:
            return None
        if kind in _PNG_KEPT:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            return b"".join(out)
    return None


METADATA_STRIPPERS: dict[str, Callable[[bytes], bytes | None]] = {
    "JPEG": strip_jpeg_metadata,
    "PNG": strip_png_metadata,
}
"""Formats whose metadata can be cut without touching the pixels; others are re-encoded."""
