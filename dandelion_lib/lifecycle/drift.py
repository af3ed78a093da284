"""The offline drift report: a folder of new photos against a model's training reference,
before they are served (``dandelion drift``, ``notebooks/04_drift.ipynb``).

Per feature, the PSI against the reference's bins with the limit it had to exceed, the KS
statistic and p-value, and the means; the verdict is *drift* when the share of drifted
features reaches ``drift_share_threshold``. The scores and the rule are
:mod:`dandelion_lib.lifecycle.monitoring`'s, the same the API applies live.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import image_stats
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image
from dandelion_lib.lifecycle.monitoring import (
    DriftError,
    drifted_features,
    feature_scores,
    ks,
    load_reference,
    open_edges,
    psi_noise_floor,
)

if TYPE_CHECKING:
    import pandas as pd

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's scores for a batch."""

    feature: str
    psi: float
    threshold: float
    """The PSI this feature had to exceed: max(configured threshold, noise floor)."""
    drifted: bool
    ks: float | None
    ks_pvalue: float | None
    reference_mean: float
    batch_mean: float


@dataclass
class DriftReport:
    """The result of :func:`drift_report`; ``verdict`` is ``"drift"`` or ``"no drift"``."""

    source: str
    images_dir: str
    images: int
    reference_images: int
    features: list[FeatureDrift]
    drifted_share: float
    share_threshold: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    batch_stats: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def drift(self) -> bool:
        return self.drifted_share >= self.share_threshold

    @property
    def verdict(self) -> str:
        return "drift" if self.drift else "no drift"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_stats")
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        d["verdict"] = self.verdict
        return d

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(f) for f in self.features]).set_index("feature")

    def summary(self) -> str:
        """A plain-text table and verdict line (what ``dandelion drift`` prints)."""
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        lines = [
            f"drift check: {self.images} images from {self.images_dir}{skipped}",
            f"reference:   {self.source} ({self.reference_images} training images)",
            "",
            f"{'feature':<16}{'psi':>8}{'limit':>8}{'ks':>8}{'p-value':>10}"
            f"{'ref mean':>10}{'new mean':>10}  drifted",
        ]
        lines += [_feature_line(f) for f in self.features]
        n_drifted = sum(f.drifted for f in self.features)
        op = ">=" if self.drift else "<"
        lines += [
            "",
            f"verdict: {self.verdict.upper()} - {n_drifted} of {len(self.features)} features "
            f"drifted (share {self.drifted_share:.2f} {op} {self.share_threshold:.2f})",
        ]
        lines += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _feature_line(f: FeatureDrift) -> str:
    ks_txt = f"{f.ks:8.3f}" if f.ks is not None else f"{'-':>8}"
    p_txt = f"{f.ks_pvalue:10.1e}" if f.ks_pvalue is not None else f"{'-':>10}"
    return (
        f"{f.feature:<16}{f.psi:8.3f}{f.threshold:8.3f}{ks_txt}{p_txt}"
        f"{f.reference_mean:10.3f}{f.batch_mean:10.3f}  {'yes' if f.drifted else 'no'}"
    )


def image_paths(images_dir: str | Path) -> list[Path]:
    """Image files under a folder (recursively, sorted)."""
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise DriftError(f"images folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def batch_stats(
    paths: list[Path], settings: Settings
) -> tuple[list[dict[str, float]], list[tuple[str, str]]]:
    """Per-image statistics of image files; unreadable ones are returned as (path, reason)."""
    limits = ImageLimits.from_settings(settings)
    rows, skipped = [], []
    for path in paths:
        try:
            img = accept_image(path.read_bytes(), limits).image
        except InvalidImageError as exc:
            skipped.append((str(path), str(exc)))
            continue
        except OSError as exc:
            skipped.append((str(path), exc.strerror or type(exc).__name__))
            continue
        rows.append(image_stats(img))
    return rows, skipped


def _reference(predictor_or_reference: Any) -> tuple[str, dict[str, Any]]:
    """The source's name and its per-feature reference (:class:`DriftError` when none)."""
    if isinstance(predictor_or_reference, str):
        source = predictor_or_reference
        reference = load_reference(source)
    elif isinstance(predictor_or_reference, dict):
        source, reference = "reference", predictor_or_reference
    else:
        source = str(getattr(predictor_or_reference, "uri", None) or "model")
        reference = getattr(predictor_or_reference, "drift_reference", None) or {}
    features: dict[str, Any] = reference.get("features", {})
    if not features:
        raise DriftError(f"{source} has no drift reference")
    return source, features


def _readable(
    paths: list[Path], images_dir: str | Path, settings: Settings
) -> tuple[list[dict[str, float]], list[tuple[str, str]]]:
    """:func:`batch_stats`, with at least ``settings.monitoring.drift_min_images`` readable images."""
    rows, skipped = batch_stats(paths, settings)
    if len(rows) < settings.monitoring.drift_min_images:
        unreadable = f" ({len(skipped)} unreadable)" if skipped else ""
        raise DriftError(
            f"a drift check needs at least {settings.monitoring.drift_min_images} readable images; "
            f"{images_dir} has {len(rows)}{unreadable}"
        )
    return rows, skipped


def _feature_drift(
    name: str, ref: dict[str, Any], values: np.ndarray, psi: float, drifted: bool, limit: float
) -> FeatureDrift:
    """One feature's row: ``limit`` is the configured PSI threshold, raised to the noise
    floor of a batch this size."""
    ks_result = ks(ref, values)
    floor = psi_noise_floor(len(values), int(ref.get("count") or 0), len(ref["proportions"]))
    return FeatureDrift(
        feature=name,
        psi=psi,
        threshold=max(limit, floor),
        drifted=drifted,
        ks=None if ks_result is None else ks_result[0],
        ks_pvalue=None if ks_result is None else ks_result[1],
        reference_mean=float(ref.get("mean", float("nan"))),
        batch_mean=float(values.mean()),
    )


def drift_report(
    predictor_or_reference: Any,
    images_dir: str | Path,
    *,
    settings: Settings,
    threshold: float | None = None,
    share_threshold: float | None = None,
) -> DriftReport:
    """Score a folder of images against a model's drift reference.

    ``predictor_or_reference``: a :class:`~dandelion_lib.serving.predict.Predictor`, a reference dict
    (:func:`~dandelion_lib.lifecycle.monitoring.build_reference`), or a model URI such as
    ``models:/dandelion@champion``. ``threshold`` and ``share_threshold`` default to the
    settings'. Raises :class:`DriftError` when there is no reference or fewer than
    ``settings.monitoring.drift_min_images`` readable images.
    """
    threshold = settings.monitoring.drift_psi_threshold if threshold is None else threshold
    paths = image_paths(images_dir)  # a wrong folder fails before any registry call
    source, reference = _reference(predictor_or_reference)
    rows, skipped = _readable(paths, images_dir, settings)
    columns = {name: [r[name] for r in rows] for name in reference}
    scores = feature_scores(reference, rows)
    flags = drifted_features(scores, reference, len(rows), threshold)
    features = [
        _feature_drift(
            name, ref, np.asarray(columns[name], np.float64), scores[name], flags[name], threshold
        )
        for name, ref in reference.items()
    ]
    return DriftReport(
        source=source,
        images_dir=str(images_dir),
        images=len(rows),
        reference_images=max((int(r.get("count") or 0) for r in reference.values()), default=0),
        features=features,
        drifted_share=sum(flags.values()) / len(flags),
        share_threshold=(
            settings.monitoring.drift_share_threshold
            if share_threshold is None
            else share_threshold
        ),
        skipped=skipped,
        batch_stats=columns,
    )


def plot_report(report: DriftReport, reference: dict[str, Any]) -> Any:
    """A matplotlib figure: per feature, the batch's share per reference bin vs the reference."""
    import matplotlib.pyplot as plt

    feats = reference.get("features", reference)
    n = len(report.features)
    cols = 3
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, f in zip(axes.flat, report.features, strict=False):
        ref = feats[f.feature]
        edges = open_edges(np.asarray(ref["edges"], dtype=np.float64))
        counts, _ = np.histogram(report.batch_stats[f.feature], bins=edges)
        x = np.arange(len(counts))
        ax.bar(x - 0.2, ref["proportions"], width=0.4, label="reference")
        ax.bar(x + 0.2, counts / max(counts.sum(), 1), width=0.4, label="batch")
        flag = "DRIFT" if f.drifted else "ok"
        ax.set_title(f"{f.feature}: PSI {f.psi:.2f} ({flag})")
        ax.set_xlabel("reference decile")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    return fig
