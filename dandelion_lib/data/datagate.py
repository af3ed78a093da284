"""The data gate between ingestion and training: a dataset version passes, or the run stops
with every problem named (:class:`DataValidationError`)."""

from __future__ import annotations

from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.labels import UNKNOWN
from dandelion_lib.core.storage import ObjectStore, open_store
from dandelion_lib.data import dataset
from dandelion_lib.data.dataset import MANIFEST_COLUMNS, SPLITS


class DataValidationError(DandelionError):
    """A dataset version failed the data quality gate."""


def check_manifest(df: Any, settings: Settings) -> list[str]:
    """Problems found in a manifest (empty when it passes the data gate). Rows labelled
    ``unknown`` are the ``negatives`` source: allowed, never counted as a class."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        return [f"manifest lacks columns {missing}"]
    if len(df) == 0:
        return ["manifest is empty"]
    problems: list[str] = []
    if df[list(MANIFEST_COLUMNS)].isna().any().any():
        problems.append("manifest has missing values")
    unknown = sorted(set(df["label"]) - set(settings.labels) - {UNKNOWN})
    if unknown:
        problems.append(f"unknown labels {unknown}")
    bad_splits = sorted(set(df["split"]) - set(SPLITS))
    if bad_splits:
        problems.append(f"unknown splits {bad_splits}")
    problems += _class_problems(df, settings)
    problems += _split_problems(df, tuple(settings.labels))
    return problems


def _class_problems(df: Any, settings: Settings) -> list[str]:
    """Classes too small or too unbalanced."""
    labels = tuple(settings.labels)
    counts = df["label"].value_counts()
    present = [int(counts.get(label, 0)) for label in labels]
    problems = [
        f"{label}: {n} images < minimum {settings.ingest.min_images_per_class}"
        for label, n in zip(labels, present, strict=True)
        if n < settings.ingest.min_images_per_class
    ]
    if min(present) > 0 and max(present) / min(present) > settings.ingest.max_class_imbalance:
        problems.append(
            f"class imbalance {max(present) / min(present):.2f} > {settings.ingest.max_class_imbalance:g}"
        )
    return problems


def _split_problems(df: Any, labels: tuple[str, ...]) -> list[str]:
    """A class missing from a split, duplicate images, near-duplicates across splits."""
    problems: list[str] = []
    for split in SPLITS:
        in_split = set(df.loc[df["split"] == split, "label"])
        problems += [
            f"split {split!r} has no {label!r} image" for label in labels if label not in in_split
        ]
    if df["sha256"].duplicated().any():
        problems.append(f"{int(df['sha256'].duplicated().sum())} duplicate images (sha256)")
    # A near-duplicate group straddles when its in-domain photos (or its negatives) are in
    # more than one split.
    side = df["label"].eq(UNKNOWN).map({True: "negatives", False: "classes"})
    straddling = df.groupby([side, df["group"]])["split"].nunique()
    if (straddling > 1).any():
        problems.append(f"{int((straddling > 1).sum())} near-duplicate groups straddle splits")
    return problems


def dataset_counts(df: Any, labels: tuple[str, ...]) -> dict[str, Any]:
    """Image counts of a manifest: total, per label, per split, and per origin (the source's
    name: ``images`` and per-split counts)."""
    origins = {
        str(origin): {"images": len(rows)}
        | {split: int((rows["split"] == split).sum()) for split in SPLITS}
        for origin, rows in df.groupby("origin", sort=True)
    }
    return {
        "images": len(df),
        "labels": {label: int((df["label"] == label).sum()) for label in labels},
        "negatives": int((df["label"] == UNKNOWN).sum()),
        "splits": {split: int((df["split"] == split).sum()) for split in SPLITS},
        "origins": origins,
    }


def validate_dataset(
    version: str | None, settings: Settings, store: ObjectStore | None = None
) -> dict[str, Any]:
    """Load a dataset version (``None``: the latest) and run the data gate; return its counts.

    Raises :class:`DataValidationError` naming every problem when the gate fails.
    """
    store = store or open_store(settings=settings)
    version = version or dataset.latest_version(store)
    df = dataset.load_manifest(store, version)
    problems = check_manifest(df, settings)
    if problems:
        raise DataValidationError(f"dataset {version} failed validation: " + "; ".join(problems))
    rejected = len(dataset.load_report(store, version).get("rejected", []))
    return {
        "dataset_version": version,
        **dataset_counts(df, tuple(settings.labels)),
        "rejected_at_ingest": rejected,
    }
