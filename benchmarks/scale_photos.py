"""The scale benchmark's photos: N distinct photos, deterministically, from the shared datasets.

Each is a random crop (60-100 % of each side), a flip, colour jitter and a JPEG re-encoding
of a photo of greenr or indomain-dev, or, for :data:`NEAR_SHARE` of them, a near-duplicate
of an earlier generated photo (a pixel's shift off, re-encoded at another quality).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared/datasets"
SOURCES = (DATASETS / "greenr", DATASETS / "indomain-dev")
LABELS = ("dandelion", "grass")
NEAR_SHARE = 0.1
"""Share of the generated photos that are near-duplicates of an earlier one."""
SEED = 2026


def _source_photos() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {label: [] for label in LABELS}
    for root in SOURCES:
        for label in LABELS:
            found[label] += sorted(p for p in (root / label).glob("*") if p.is_file())
    return found


def _variant(img: Any, rng: np.random.Generator) -> Any:
    """A random crop (60-100 % of each side), a flip and colour jitter of ``img``."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(float(rng.uniform(0.8, 1.2)))
    return out


def _jpeg(img: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate_photos(n: int, out: Path, seed: int = SEED) -> dict[str, int]:
    """``n`` distinct photos under ``out/<label>/``, the same for the same ``n`` and seed;
    returns how many of each kind (``variants``, ``near_duplicates``)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _source_photos()
    made: list[tuple[str, Any]] = []
    counts = Counter[str]()
    for label in LABELS:
        (out / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = LABELS[i % 2]
        earlier = [img for lab, img in made if lab == label]
        if earlier and rng.random() < NEAR_SHARE:
            base = earlier[int(rng.integers(len(earlier)))]
            img = base.crop((1, 0, base.width, base.height))  # a pixel's shift
            data, kind = _jpeg(img, int(rng.integers(60, 75))), "near_duplicates"
        else:
            pick = sources[label][int(rng.integers(len(sources[label])))]
            with Image.open(pick) as src:
                img = _variant(src.convert("RGB"), rng)
            data, kind = _jpeg(img, int(rng.integers(80, 96))), "variants"
            made = [*made[-199:], (label, img)]
        (out / label / f"{i:07d}.jpg").write_bytes(data)
        counts[kind] += 1
    return dict(counts)
