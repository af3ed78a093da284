"""The quality gate of an ingestion: no version is written when a class has too few valid
images or the classes are too unbalanced (:class:`DatasetQualityError`, one line)."""

from __future__ import annotations

from dandelion_lib.core.config import Settings
from dandelion_lib.data.rejections import IngestError


class DatasetQualityError(IngestError):
    """Too few images in a class, or classes too unbalanced."""


def check_quality(classes: dict[str, dict[str, int]], rejected: int, settings: Settings) -> None:
    """Raise :class:`DatasetQualityError` unless every class of ``settings.labels`` has
    ``min_images_per_class`` images (``classes``: counts per label, ``total`` among them) and
    the largest is at most ``max_class_imbalance`` times the smallest. ``rejected`` (how many
    items were left out) is named in the message."""
    counts = {label: classes.get(label, {}).get("total", 0) for label in settings.labels}
    left_out = f"; {rejected} items rejected" if rejected else ""
    for label, n in counts.items():
        if n < settings.ingest.min_images_per_class:
            raise DatasetQualityError(
                f"class {label!r} has {n} valid images, below the minimum of "
                f"{settings.ingest.min_images_per_class} (DANDELION_MIN_IMAGES_PER_CLASS){left_out}"
            )
    hi, lo = max(counts.values()), min(counts.values())
    if lo and hi / lo > settings.ingest.max_class_imbalance:
        shown = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise DatasetQualityError(
            f"class balance {hi / lo:.2f}:1 ({shown}) is worse than the limit "
            f"{settings.ingest.max_class_imbalance:g}:1 (DANDELION_MAX_CLASS_IMBALANCE)"
        )
