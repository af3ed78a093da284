"""Refusals on photos from a source never seen: the open-set trade-off curve, leave one source out.

Data. Three labelled sources: ``greenr``, and ``indomain-dev`` in its two parts, the
dandelions (TensorFlow flower photos) and the lawns (lawn-care websites); negatives
``ood-dev`` (half of each kind fitted on, the other half only measured). Features: the
default backbone's (EfficientNet-Lite0, 1600-d), extracted once per image.

For each split seed (0-4; the library's split: per source and class 70 / 15 / 15) and each
setup, the default detector (``logistic``) is fitted on the training photos of the kept
sources and the fitted negatives, and its threshold calibrated for 97 % retention on the kept
sources' validation photos (pooled), then raised to a floor (none, 0, 1, 1.5, 2, 3):

* ``unseen``: leave one source out; the photos of the source left out (all of them) are
  scored: the refusals a new photographer's photos would get. Setups: without the
  indomain-dev dandelions, without its lawns, without greenr, and greenr alone (the one
  labelled source case: the README's online command).
* ``all``: every source kept; refusals of the held-out in-domain test photos, and of the
  held-out negatives, overall and daisies + sunflowers (``hard``).

Printed: mean over the seeds per floor. docs/open-set.md keeps the table and why the shipped
floors (1.0 with two or more sources, 3.0 with one) were chosen.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared/datasets"
FOLDERS = {
    "greenr": Path(os.environ.get("DANDELION_TEST_DATASET", DATASETS / "greenr")),
    "indomain-dev": Path(os.environ.get("DANDELION_INDOMAIN_DATASET", DATASETS / "indomain-dev")),
    "ood-dev": Path(os.environ.get("DANDELION_OOD_DATASET", DATASETS / "ood-dev")),
}
FLOORS = (None, 0.0, 1.0, 1.5, 2.0, 3.0)
SEEDS = range(5)
RETENTION = 0.97
HARD = ("daisy", "sunflowers")
SETUPS = {
    "unseen: indomain-dev dandelions": (("greenr", "idd-grass"), "idd-dandelion"),
    "unseen: indomain-dev lawns": (("greenr", "idd-dandelion"), "idd-grass"),
    "unseen: greenr": (("idd-dandelion", "idd-grass"), "greenr"),
    "unseen: indomain-dev, greenr alone": (("greenr",), "indomain-dev"),
}


def _photos() -> list[tuple[str, str, Path]]:
    """(source, folder, path) of every photo: ``idd-dandelion`` / ``idd-grass`` for the two
    parts of indomain-dev, ``ood`` for negatives (folder = kind)."""
    out = []
    for name, root in FOLDERS.items():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            source = {"indomain-dev": f"idd-{sub.name}", "ood-dev": "ood"}.get(name, name)
            out += [(source, sub.name, p) for p in sorted(sub.iterdir()) if p.is_file()]
    return out


def _features(photos: list[tuple[str, str, Path]]) -> tuple[np.ndarray, list[str]]:
    from dandelion_lib.core.features import FeatureSpec, bytes_to_model_input
    from dandelion_lib.training.model import build_backbone

    backbone = build_backbone("efficientnet_lite0")
    spec = FeatureSpec()
    pixels = np.stack([bytes_to_model_input(p.read_bytes(), spec) for _, _, p in photos])
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for _, _, p in photos]
    feats = [
        backbone.model.predict(pixels[i : i + 32], verbose=0) for i in range(0, len(pixels), 32)
    ]
    return np.concatenate(feats), shas


def _split(source: np.ndarray, folder: np.ndarray, shas: list[str], seed: int) -> np.ndarray:
    """The library's splits with split seed ``seed``: in-domain photos per (source, class)
    (:func:`dandelion_lib.data.dataset.assign_splits`, each photo its own group), negatives
    half fitted per kind (:func:`dandelion_lib.data.dataset.assign_negative_splits`)."""
    from dandelion_lib.data.dataset import assign_negative_splits, assign_splits

    out = np.empty(len(shas), dtype=object)
    neg = source == "ood"
    labelled = np.nonzero(~neg)[0]
    out[labelled] = assign_splits(
        [str(folder[i]) for i in labelled],
        [shas[i] for i in labelled],
        seed,
        origins=[str(source[i]) for i in labelled],
    )
    negatives = np.nonzero(neg)[0]
    out[negatives] = assign_negative_splits(
        [shas[i] for i in negatives], [str(folder[i]) for i in negatives], seed
    )
    return out


def _scores(
    x: np.ndarray, y: np.ndarray, fit: np.ndarray, neg: np.ndarray, cal: np.ndarray
) -> tuple[np.ndarray, float]:
    from dandelion_lib.training.openset import OpenSetDetector, threshold_for_retention

    detector = OpenSetDetector(method="logistic").fit(x[fit], y[fit], negatives=x[neg])
    scores = detector.score(x)
    return scores, threshold_for_retention(scores[cal], RETENTION)


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not all(p.is_dir() for p in FOLDERS.values()):
        print("source-shift benchmark skipped: a dataset folder is missing")
        return 0
    photos = _photos()
    x, shas = _features(photos)
    source = np.asarray([s for s, _, _ in photos])
    folder = np.asarray([f for _, f, _ in photos])
    y = (folder == "grass").astype(int)
    in_domain = source != "ood"
    rows: dict[str, dict[str | float | None, list[float]]] = {}

    def add(name: str, floor: float | None, value: float) -> None:
        rows.setdefault(name, {}).setdefault(floor, []).append(value)

    for seed in SEEDS:
        split = _split(source, folder, shas, seed)
        neg = ~in_domain & (split == "train")
        held_neg = ~in_domain & (split == "test")
        hard = held_neg & np.isin(folder, HARD)
        for name, (kept, unseen) in SETUPS.items():
            keep = in_domain & np.isin(source, kept)
            scores, conformal = _scores(
                x, y, keep & (split == "train"), neg, keep & (split == "val")
            )
            target = (
                np.char.startswith(source.astype(str), "idd")
                if unseen == "indomain-dev"
                else source == unseen
            )
            for floor in FLOORS:
                t = conformal if floor is None else max(conformal, floor)
                add(name, floor, float((scores[target] > t).mean()))
                add(name + " (hard negatives)", floor, float((scores[hard] > t).mean()))
        scores, conformal = _scores(
            x, y, in_domain & (split == "train"), neg, in_domain & (split == "val")
        )
        for floor in FLOORS:
            t = conformal if floor is None else max(conformal, floor)
            add(
                "all: in-domain test photos",
                floor,
                float((scores[in_domain & (split == "test")] > t).mean()),
            )
            add("all: negatives", floor, float((scores[held_neg] > t).mean()))
            add("all: negatives, hard", floor, float((scores[hard] > t).mean()))

    head = "".join(f"{'conformal' if f is None else f'floor {f:g}':>12}" for f in FLOORS)
    print(f"share answered 'unknown', mean of {len(SEEDS)} split seeds\n{'setup':<52}{head}")
    for name, by_floor in rows.items():
        print(f"{name:<52}" + "".join(f"{100 * np.mean(by_floor[f]):>11.1f}%" for f in FLOORS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
