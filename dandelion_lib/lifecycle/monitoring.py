"""Drift monitoring: compare new images' statistics with the model's training reference.

The reference (:func:`build_reference`) summarises the per-image statistics of the training
split (:data:`dandelion_lib.core.features.STAT_COLUMNS`) and is logged with every model. Two
scores compare a batch with it, per feature:

* **PSI** (population stability index) over the reference's ten quantile bins: *how much*
  the distribution moved. Conventionally 0.1-0.2 is a moderate shift, above 0.2 a real one.
* **KS** (Kolmogorov-Smirnov statistic and p-value, against the reference's quantiles):
  *whether* the move is more than chance.

A feature counts as drifted when its PSI is above the threshold (0.2 by default) **and**
above what sampling noise alone produces for a window of that size (the 99.9 % quantile of
PSI under no drift, ``chi2(bins - 1) * (1/n + 1/n_ref)``), so small windows do not raise
false alarms. The share of drifted features is the batch's drift score; at or above
``drift_share_threshold`` (0.5) the verdict is *drift*.

The same code runs live in the API (:class:`DriftMonitor`, a sliding window of served
images exported as Prometheus gauges) and offline (:func:`drift_report`, the
``dandelion drift`` command and ``notebooks/04_drift.ipynb``) to check a folder of new
photos before serving them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dandelion_lib.core.config import Settings, get_settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.features import STAT_COLUMNS, image_stats
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image
from dandelion_lib.lifecycle.registry import configure_mlflow, model_uri

if TYPE_CHECKING:
    import pandas as pd

REFERENCE_BINS = 10
REFERENCE_QUANTILES = 101
"""Quantiles stored per feature (0 %, 1 %, ..., 100 %): the reference CDF used by KS."""

PSI_DRIFT_THRESHOLD = 0.2
"""PSI above this means a feature has drifted (0.1-0.2 is a moderate shift)."""

DRIFT_SHARE_THRESHOLD = 0.5
"""Share of drifted features at or above which a batch is reported as drifted."""

NOISE_QUANTILE = 0.999
"""Quantile of PSI under no drift below which a score is treated as sampling noise."""

PSI_SMOOTHING = 0.5
"""Pseudo-count added to every bin of the batch histogram (keeps empty bins finite)."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class DriftError(DandelionError):
    """A drift check that cannot run (no reference, no images, too few images)."""


# --- reference ---------------------------------------------------------------------------


def build_reference(stats: Any, columns: tuple[str, ...] = STAT_COLUMNS) -> dict[str, Any]:
    """Summarise per-image statistics (a DataFrame or a mapping of column -> values).

    Returns a JSON-able reference: per feature, quantile bin edges and the share of
    reference images in each bin (the basis of PSI), 101 quantiles (the basis of KS),
    mean, std and count.
    """
    ref: dict[str, Any] = {"bins": REFERENCE_BINS, "features": {}}
    for col in columns:
        values = np.asarray(stats[col], dtype=np.float64)
        if len(values) == 0:
            raise DriftError(f"cannot build a drift reference: no values for {col!r}")
        edges = np.unique(np.quantile(values, np.linspace(0, 1, REFERENCE_BINS + 1)))
        counts, _ = np.histogram(values, bins=_open_edges(edges))
        ref["features"][col] = {
            "edges": edges.tolist(),
            "proportions": (counts / len(values)).tolist(),
            "quantiles": np.quantile(values, np.linspace(0, 1, REFERENCE_QUANTILES)).tolist(),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "count": len(values),
        }
    return ref


def _open_edges(edges: np.ndarray) -> np.ndarray:
    inner = edges[1:-1] if len(edges) > 2 else edges[:0]
    return np.concatenate([[-np.inf], inner, [np.inf]])


def load_reference(model_uri: str) -> dict[str, Any]:
    """The drift reference logged with a model (reads only its MLmodel file, not the weights)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        meta = mlflow.models.get_model_info(model_uri).metadata or {}
    except (MlflowException, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DriftError(f"cannot read model {model_uri}: {first}") from exc
    reference: dict[str, Any] = meta.get("drift_reference") or {}
    if not reference.get("features"):
        raise DriftError(f"model {model_uri} was logged without a drift reference")
    return reference


# --- scores ------------------------------------------------------------------------------


def psi(reference: dict[str, Any], values: np.ndarray, smoothing: float = PSI_SMOOTHING) -> float:
    """Population stability index of ``values`` against one feature's reference bins.

    The batch histogram gets ``smoothing`` pseudo-counts per bin, so a bin that happens to
    be empty in a small batch adds a bounded amount instead of an arbitrarily large one.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return 0.0
    edges = _open_edges(np.asarray(reference["edges"], dtype=np.float64))
    expected = np.asarray(reference["proportions"], dtype=np.float64)
    counts, _ = np.histogram(values, bins=edges)
    actual = (counts + smoothing) / (len(values) + smoothing * len(counts))
    expected = np.clip(expected, 1e-4, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_noise_floor(n: int, n_reference: int, bins: int = REFERENCE_BINS) -> float:
    """PSI that sampling noise alone exceeds with probability ``1 - NOISE_QUANTILE``.

    Under no drift, PSI is approximately ``chi2(bins - 1) * (1/n + 1/n_reference)``.
    """
    from scipy.stats import chi2

    if n <= 0:
        return math.inf
    inv_ref = 1.0 / n_reference if n_reference > 0 else 0.0
    return float(chi2.ppf(NOISE_QUANTILE, max(bins - 1, 1)) * (1.0 / n + inv_ref))


def ks(reference: dict[str, Any], values: np.ndarray) -> tuple[float, float] | None:
    """Kolmogorov-Smirnov statistic and p-value of ``values`` against the reference.

    The reference CDF is interpolated linearly between its stored quantiles (repeated
    quantiles, e.g. sharpness clipped at 1.0, become a jump). The p-value uses the
    effective sample size ``n * n_ref / (n + n_ref)`` of the two-sample test; with ties it
    is conservative. None when the reference has no quantiles or the batch is empty.
    """
    quantiles = reference.get("quantiles")
    values = np.sort(np.asarray(values, dtype=np.float64))
    if not quantiles or len(values) == 0:
        return None
    from scipy.stats import kstwo

    q = np.asarray(quantiles, dtype=np.float64)
    probs = np.linspace(0.0, 1.0, len(q))
    # |ECDF - F| is largest at a breakpoint of either function: check both one-sided limits.
    points = np.union1d(values, q)
    n = len(values)
    ecdf_at = np.searchsorted(values, points, side="right") / n
    ecdf_below = np.searchsorted(values, points, side="left") / n
    stat = float(
        max(
            np.max(np.abs(ecdf_at - _reference_cdf(points, q, probs, "right"))),
            np.max(np.abs(ecdf_below - _reference_cdf(points, q, probs, "left"))),
        )
    )
    m = int(reference.get("count") or 0)
    n_eff = n * m / (n + m) if m > 0 else n
    return stat, float(kstwo.sf(stat, max(round(n_eff), 1)))


def _reference_cdf(
    x: np.ndarray, q: np.ndarray, probs: np.ndarray, side: Literal["left", "right"]
) -> np.ndarray:
    """Piecewise-linear CDF through (q, probs): its value (``side="right"``) or its left
    limit (``side="left"``) at each x."""
    idx = np.searchsorted(q, x, side=side)
    lo = np.clip(idx - 1, 0, len(q) - 1)
    hi = np.clip(idx, 0, len(q) - 1)
    span = q[hi] - q[lo]
    frac = np.where(span > 0, (x - q[lo]) / np.where(span > 0, span, 1.0), 0.0)
    out = probs[lo] + frac * (probs[hi] - probs[lo])
    out = np.where(idx == 0, 0.0, out)
    return np.where(idx >= len(q), 1.0, out)


def drifted_features(
    scores: dict[str, float],
    reference: dict[str, Any],
    n: int,
    threshold: float = PSI_DRIFT_THRESHOLD,
) -> dict[str, bool]:
    """Per feature: PSI above ``threshold`` and above the noise floor for ``n`` images."""
    out = {}
    for name, score in scores.items():
        ref = reference.get(name, {})
        floor = psi_noise_floor(n, int(ref.get("count") or 0), len(ref.get("proportions", [])))
        out[name] = bool(score > max(threshold, floor))
    return out


class DriftMonitor:
    """A sliding window of served images' statistics, scored against a reference.

    The API calls :meth:`add` for each served image (from its inference worker) and reads
    :meth:`scores` / :meth:`drifted_share` when it refreshes its gauges; both copy the
    window under a lock, so readers and the writer can run on different threads.
    """

    def __init__(
        self,
        reference: dict[str, Any],
        window: int = 200,
        threshold: float = PSI_DRIFT_THRESHOLD,
    ):
        self.reference: dict[str, Any] = reference.get("features", {}) if reference else {}
        self.window: deque[dict[str, float]] = deque(maxlen=window)
        self.threshold = threshold
        self._lock = threading.Lock()

    def add(self, stats: dict[str, float]) -> None:
        with self._lock:
            self.window.append(stats)

    def __len__(self) -> int:
        return len(self.window)

    def _rows(self) -> list[dict[str, float]]:
        with self._lock:
            return list(self.window)

    def scores(self) -> dict[str, float]:
        """PSI per feature over the current window (empty when no reference)."""
        return _scores(self.reference, self._rows())

    def drifted(self, threshold: float | None = None) -> dict[str, bool]:
        """Per feature: drifted or not (see :func:`drifted_features`)."""
        return self._judge(threshold)[1]

    def drifted_share(self, threshold: float | None = None) -> float:
        """Share of features that drifted, in [0, 1] (0 when no reference or no images)."""
        return self.snapshot(threshold)[1]

    def snapshot(self, threshold: float | None = None) -> tuple[dict[str, float], float]:
        """PSI per feature and the drifted share, both from one copy of the window."""
        scores, flags = self._judge(threshold)
        return scores, (sum(flags.values()) / len(flags) if flags else 0.0)

    def _judge(self, threshold: float | None) -> tuple[dict[str, float], dict[str, bool]]:
        """PSI and drift flags per feature, from one copy of the window."""
        rows = self._rows()
        scores = _scores(self.reference, rows)
        flags = drifted_features(
            scores, self.reference, len(rows), self.threshold if threshold is None else threshold
        )
        return scores, flags


def _scores(reference: dict[str, Any], rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        name: psi(ref, np.asarray([r[name] for r in rows if name in r], dtype=np.float64))
        for name, ref in reference.items()
    }


# --- offline report ----------------------------------------------------------------------


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
        for f in self.features:
            ks_txt = f"{f.ks:8.3f}" if f.ks is not None else f"{'-':>8}"
            p_txt = f"{f.ks_pvalue:10.1e}" if f.ks_pvalue is not None else f"{'-':>10}"
            lines.append(
                f"{f.feature:<16}{f.psi:8.3f}{f.threshold:8.3f}{ks_txt}{p_txt}"
                f"{f.reference_mean:10.3f}{f.batch_mean:10.3f}  {'yes' if f.drifted else 'no'}"
            )
        n_drifted = sum(f.drifted for f in self.features)
        op = ">=" if self.drift else "<"
        lines += [
            "",
            f"verdict: {self.verdict.upper()} - {n_drifted} of {len(self.features)} features "
            f"drifted (share {self.drifted_share:.2f} {op} {self.share_threshold:.2f})",
        ]
        for path, reason in self.skipped:
            lines.append(f"skipped {path}: {reason}")
        return "\n".join(lines)


def image_paths(images_dir: str | Path) -> list[Path]:
    """Image files under a folder (recursively, sorted)."""
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise DriftError(f"images folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def batch_stats(
    paths: list[Path], settings: Settings | None = None
) -> tuple[list[dict[str, float]], list[tuple[str, str]]]:
    """Per-image statistics of image files; unreadable ones are returned as (path, reason)."""
    settings = settings or get_settings()
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


def drift_report(
    predictor_or_reference: Any,
    images_dir: str | Path,
    *,
    threshold: float | None = None,
    share_threshold: float | None = None,
    settings: Settings | None = None,
) -> DriftReport:
    """Score a folder of images against a model's drift reference.

    ``predictor_or_reference``: a :class:`~dandelion_lib.serving.predict.Predictor`, a reference dict
    (:func:`build_reference`), or a model URI such as ``models:/dandelion@champion``.
    Raises :class:`DriftError` when there is no reference or fewer than
    ``settings.drift_min_images`` readable images.
    """
    settings = settings or get_settings()
    threshold = settings.drift_psi_threshold if threshold is None else threshold
    share_threshold = settings.drift_share_threshold if share_threshold is None else share_threshold

    paths = image_paths(images_dir)  # a wrong folder fails before any registry call
    source: str
    if isinstance(predictor_or_reference, str):
        source = predictor_or_reference
        reference = load_reference(source)
    elif isinstance(predictor_or_reference, dict):
        source, reference = "reference", predictor_or_reference
    else:
        source = str(getattr(predictor_or_reference, "uri", None) or "model")
        reference = getattr(predictor_or_reference, "drift_reference", None) or {}
    features_ref: dict[str, Any] = reference.get("features", {})
    if not features_ref:
        raise DriftError(f"{source} has no drift reference")

    rows, skipped = batch_stats(paths, settings)
    if len(rows) < settings.drift_min_images:
        raise DriftError(
            f"a drift check needs at least {settings.drift_min_images} readable images; "
            f"{images_dir} has {len(rows)}" + (f" ({len(skipped)} unreadable)" if skipped else "")
        )
    columns = {name: [r[name] for r in rows] for name in features_ref}
    scores = _scores(features_ref, rows)
    flags = drifted_features(scores, features_ref, len(rows), threshold)
    features = []
    for name, ref in features_ref.items():
        values = np.asarray(columns[name], dtype=np.float64)
        ks_result = ks(ref, values)
        floor = psi_noise_floor(len(rows), int(ref.get("count") or 0), len(ref["proportions"]))
        features.append(
            FeatureDrift(
                feature=name,
                psi=scores[name],
                threshold=max(threshold, floor),
                drifted=flags[name],
                ks=None if ks_result is None else ks_result[0],
                ks_pvalue=None if ks_result is None else ks_result[1],
                reference_mean=float(ref.get("mean", float("nan"))),
                batch_mean=float(values.mean()),
            )
        )
    share = sum(flags.values()) / len(flags)
    ref_images = max((int(r.get("count") or 0) for r in features_ref.values()), default=0)
    return DriftReport(
        source=source,
        images_dir=str(images_dir),
        images=len(rows),
        reference_images=ref_images,
        features=features,
        drifted_share=share,
        share_threshold=share_threshold,
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
        edges = _open_edges(np.asarray(ref["edges"], dtype=np.float64))
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


# --- CLI ---------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="Model URI whose training reference to compare with "
        "(default: models:/<model_name>@champion).",
    )
    parser.add_argument(
        "--images", required=True, help="Folder of new images (searched recursively)."
    )
    parser.add_argument("--threshold", type=float, default=None, help="PSI threshold per feature.")
    parser.add_argument(
        "--share-threshold",
        type=float,
        default=None,
        help="Share of drifted features at or above which the verdict is drift.",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def cli(args: argparse.Namespace) -> int:
    """Print per-feature scores and a verdict; exit status 1 when the batch drifted."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # clean stderr
    settings = get_settings()
    configure_mlflow(settings)
    uri = args.model or model_uri(settings.model_name, settings.model_alias)
    report = drift_report(
        uri,
        args.images,
        threshold=args.threshold,
        share_threshold=args.share_threshold,
        settings=settings,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 1 if report.drift else 0
