"""Drift scores on real images: in-distribution photos pass, dark and grayscale ones drift."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import STAT_COLUMNS, image_stats
from dandelion_lib.core.images import decode_image
from dandelion_lib.lifecycle import monitoring
from dandelion_lib.lifecycle.drift import drift_report
from dandelion_lib.lifecycle.monitoring import (
    DriftError,
    DriftMonitor,
    build_reference,
    ks,
    psi,
    psi_noise_floor,
)

# The fast tier (`nox -s unit`): no servers, no training.
pytestmark = pytest.mark.unit

DEFAULTS = Settings()


def _stats(paths: list[Path]) -> list[dict[str, float]]:
    return [image_stats(decode_image(p.read_bytes())) for p in paths]


def test_reference_has_bins_quantiles_and_counts(drift_reference: dict) -> None:
    assert set(drift_reference["features"]) == set(STAT_COLUMNS)
    for ref in drift_reference["features"].values():
        assert ref["count"] == 200
        assert len(ref["quantiles"]) == monitoring.REFERENCE_QUANTILES
        assert abs(sum(ref["proportions"]) - 1.0) < 1e-9
        assert len(ref["proportions"]) == len(ref["edges"]) - 1 or len(ref["edges"]) <= 2


def test_psi_is_zero_on_the_reference_itself_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=500)
    ref = build_reference({"brightness": values}, ("brightness",))["features"]["brightness"]
    assert psi(ref, values) < 0.01
    assert psi(ref, values + 1.0) > 0.5
    assert psi(ref, np.array([])) == 0.0


def test_psi_of_a_small_batch_with_empty_bins_stays_bounded() -> None:
    """A batch of 5 leaves most bins empty; smoothing keeps PSI finite and modest."""
    rng = np.random.default_rng(1)
    values = rng.uniform(size=1000)
    ref = build_reference({"brightness": values}, ("brightness",))["features"]["brightness"]
    assert psi(ref, rng.uniform(size=5)) < psi_noise_floor(5, 1000)


def test_ks_matches_scipy_two_sample_test() -> None:
    """The quantile-based KS is close to scipy's exact two-sample test on the full data."""
    rng = np.random.default_rng(2)
    ref_values = rng.normal(size=300)
    ref = build_reference({"brightness": ref_values}, ("brightness",))["features"]["brightness"]
    for shift in (0.0, 0.3, 1.0):
        batch = rng.normal(shift, size=80)
        stat, p = ks(ref, batch)  # type: ignore[misc]
        expected = ks_2samp(ref_values, batch, method="asymp")
        assert stat == pytest.approx(expected.statistic, abs=0.02)
        assert p == pytest.approx(expected.pvalue, rel=0.5, abs=0.05)


def test_ks_handles_ties_like_clipped_sharpness() -> None:
    rng = np.random.default_rng(3)
    ref_values = np.minimum(rng.uniform(0, 1.5, 300), 1.0)  # a third of the mass at 1.0
    ref = build_reference({"sharpness": ref_values}, ("sharpness",))["features"]["sharpness"]
    stat, p = ks(ref, np.minimum(rng.uniform(0, 1.5, 60), 1.0))  # type: ignore[misc]
    assert stat < 0.2 and p > 0.05
    assert ks({"edges": [0, 1], "proportions": [1.0]}, np.ones(3)) is None


def test_heldout_images_do_not_drift(drift_reference: dict, heldout_dir: Path) -> None:
    report = drift_report(drift_reference, heldout_dir, settings=DEFAULTS)
    assert report.images == 60 and not report.skipped
    assert report.verdict == "no drift"
    assert report.drifted_share == 0.0
    assert all(not f.drifted for f in report.features)
    assert all(f.ks_pvalue is not None and f.ks_pvalue > 1e-3 for f in report.features)


def test_dark_images_drift(drift_reference: dict, dark_dir: Path) -> None:
    report = drift_report(drift_reference, dark_dir, settings=DEFAULTS)
    by_name = {f.feature: f for f in report.features}
    assert report.verdict == "drift" and report.drifted_share >= 0.5
    assert by_name["brightness"].drifted and by_name["brightness"].psi > 1.0
    assert by_name["brightness"].batch_mean < 0.5 * by_name["brightness"].reference_mean
    assert by_name["brightness"].ks_pvalue is not None and by_name["brightness"].ks_pvalue < 1e-6


def test_grayscale_images_drift_in_colour_features(drift_reference: dict, gray_dir: Path) -> None:
    report = drift_report(drift_reference, gray_dir, settings=DEFAULTS)
    drifted = {f.feature for f in report.features if f.drifted}
    assert {"saturation", "green_fraction", "yellow_fraction"} <= drifted
    assert "brightness" not in drifted  # converting to gray keeps the luminance
    assert report.verdict == "drift"


def test_report_skips_unreadable_files_and_lists_them(
    drift_reference: dict, heldout_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(heldout_dir.glob("*.jpg"))[:25]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    report = drift_report(drift_reference, folder, settings=DEFAULTS)
    assert report.images == 25
    assert [Path(p).name for p, _ in report.skipped] == ["broken.jpg"]
    assert "skipped" in report.summary() and "broken.jpg" in report.summary()
    d = report.to_dict()
    assert d["verdict"] == "no drift" and d["skipped"][0]["path"].endswith("broken.jpg")


def test_report_errors_are_one_line(
    drift_reference: dict, heldout_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(DriftError, match="does not exist"):
        drift_report(drift_reference, tmp_path / "missing", settings=DEFAULTS)
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(heldout_dir.glob("*.jpg"))[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DriftError, match="at least 20 readable images"):
        drift_report(drift_reference, few, settings=DEFAULTS)
    with pytest.raises(DriftError, match="no drift reference"):
        drift_report({}, heldout_dir, settings=DEFAULTS)
    # A smaller minimum is a setting.
    report = drift_report(drift_reference, few, settings=Settings(drift_min_images=3))
    assert report.images == 3


def test_share_threshold_and_psi_threshold_are_settings(
    drift_reference: dict, gray_dir: Path
) -> None:
    strict = drift_report(drift_reference, gray_dir, settings=Settings(drift_share_threshold=0.9))
    assert strict.verdict == "no drift" and 0.4 <= strict.drifted_share < 0.9
    lenient = drift_report(drift_reference, gray_dir, threshold=100.0, settings=DEFAULTS)
    assert lenient.drifted_share == 0.0


def test_monitor_window_ignores_noise_then_flags_a_drifted_batch(
    drift_reference: dict, heldout_paths: list[Path], dark_dir: Path
) -> None:
    """The API's sliding window: few in-distribution images never count as drift even
    when their raw PSI is high; a batch of dark photos does."""
    monitor = DriftMonitor(drift_reference, window=120)
    assert monitor.scores()["brightness"] == 0.0 and monitor.drifted_share() == 0.0
    dandelions, grasses = heldout_paths[:60], heldout_paths[-60:]
    heldout = _stats([p for pair in zip(dandelions, grasses, strict=True) for p in pair])
    for row in heldout[:8]:
        monitor.add(row)
    assert monitor.drifted_share() == 0.0
    for row in heldout[8:60]:
        monitor.add(row)
    assert len(monitor) == 60 and monitor.drifted_share() == 0.0
    assert max(monitor.scores().values()) < 0.5
    for row in _stats(sorted(dark_dir.glob("*.jpg"))):
        monitor.add(row)
    assert len(monitor) == 100
    assert monitor.drifted_share() >= 0.5
    assert monitor.scores()["brightness"] > 0.5
    assert monitor.drifted()["brightness"]
    # The window slides: after 120 in-distribution images the dark ones are gone.
    for row in heldout:
        monitor.add(row)
    assert len(monitor) == 120 and monitor.drifted_share() == 0.0


def test_monitor_without_reference_reports_nothing() -> None:
    monitor = DriftMonitor({}, window=10)
    monitor.add(dict.fromkeys(STAT_COLUMNS, 0.5))
    assert monitor.scores() == {} and monitor.drifted_share() == 0.0


def test_monitor_reads_while_a_writer_appends(drift_reference: dict) -> None:
    """Readers (the metrics refresh) and the writer (the inference worker) run on
    different threads; reading must never fail with a mutated-deque error."""
    monitor = DriftMonitor(drift_reference, window=50)
    row = dict.fromkeys(STAT_COLUMNS, 0.5)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        while not stop.is_set():
            monitor.add(row)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            try:
                monitor.drifted_share()
            except BaseException as exc:  # pragma: no cover - the failure being tested
                errors.append(exc)
                break
    finally:
        stop.set()
        t.join()
    assert not errors


def test_api_drift_gauges_apply_the_noise_floor(
    drift_reference: dict, heldout_paths: list[Path], dark_dir: Path
) -> None:
    """The API's ``dandelion_drift_share`` counts a feature only above the noise floor:
    a handful of in-distribution photos (raw PSI high by chance) reads 0, dark photos do not."""
    from api.metrics import ApiMetrics

    metrics = ApiMetrics()
    monitor = DriftMonitor(drift_reference, window=120)
    for row in _stats(heldout_paths[:4] + heldout_paths[-4:]):
        monitor.add(row)
    metrics.update_drift(monitor)
    registry = metrics.registry
    raw = {
        f: registry.get_sample_value("dandelion_drift_psi", {"feature": f}) for f in STAT_COLUMNS
    }
    assert max(v for v in raw.values() if v is not None) > monitoring.PSI_DRIFT_THRESHOLD
    assert registry.get_sample_value("dandelion_drift_share") == 0.0
    assert registry.get_sample_value("dandelion_drift_window_images") == 8
    for row in _stats(sorted(dark_dir.glob("*.jpg"))):
        monitor.add(row)
    metrics.update_drift(monitor)
    assert registry.get_sample_value("dandelion_drift_share") == monitor.drifted_share() >= 0.5
