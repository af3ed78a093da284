"""Retraining after accepted feedback with a warm feature store, and embedding extraction
at 1x, 2x and 4x the reference dataset.

Part 1 and 2 (one embedded store in a temporary folder: local files, SQLite MLflow, SQLite
feedback DB). Ten photos per class of the reference folder are held back; the rest is
ingested and trained with the default ``TrainConfig`` and an empty feature store (the
baseline: full training from scratch). The held-back photos then go through the real
feedback path: the trained model answers them, each gets feedback with its photo and its
folder's label, a reviewer accepts it; ``add_accepted_feedback`` makes the next dataset
version and the same recipe trains again, this time with the feature store the first
training filled. Figures: ingest and training time of both, the speed-up (target: the
retraining >= 5x faster than the full training), each training's phases and every
``features_*`` metric it logged to MLflow. A control measured in the same run trains the
new version once more with ``DANDELION_FEATURE_CACHE=false`` (same warm process), so the
speed-up due to the feature store alone shows apart from one-time process start-up.

Part 3: the library's extraction path (``feature_extractor``, ``split_features``, the
feature store of ``open_feature_store``) over 1x, 2x and 4x the reference images; the
copies are mirrored, flipped or rotated and re-encoded with Pillow, so every image has
its own sha256. Figures: a cold extraction into an empty feature store per size (expected:
time grows linearly, ratios about 2 and 4), the same 1x without a feature store (the cost
of storing), and the incremental cost on a warm store (1x cached, then 2x: only the new
images extracted; then 4x), plus a fully cached re-read.

Arguments: ``quick`` (``nox -s bench -- retrain quick``) ingests 20 photos per class (then
the 20 feedback photos), trains 50 head epochs with one augmented view per image and
extracts at 1x and 2x of 40 images: a check that the benchmark runs, not a figure to quote.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
LABELS = ("dandelion", "grass")
HELD_BACK = 10
"""Photos per class kept out of the first dataset version: they come back as feedback."""
TARGET_SPEEDUP = 5.0
ONLY_BY_NAME = True  # about half an hour: `nox -s bench` without names leaves it out


@dataclass(frozen=True)
class Mode:
    name: str
    per_class: int | None
    """Photos per class ingested at first (None: all but the held-back ones)."""
    epochs: int | None
    """Head epochs (None: the default TrainConfig's)."""
    augment_copies: int | None
    """Augmented views per training image (None: the default TrainConfig's)."""
    scale_base: int | None
    """Images of the 1x extraction size (None: the whole reference folder)."""
    scales: tuple[int, ...]


FULL = Mode("full", None, None, None, None, (1, 2, 4))
QUICK = Mode("quick", 20, 50, 1, 40, (1, 2))


def _photos() -> dict[str, list[Path]]:
    found = {label: sorted((GREENR / label).glob("*.jpg")) for label in LABELS}
    if any(len(v) <= HELD_BACK for v in found.values()):
        raise SystemExit(f"{GREENR} needs more than {HELD_BACK} JPEGs per class folder")
    return found


# --------------------------------------------------------------------------------------
# Parts 1 and 2: full training vs retraining after accepted feedback
# --------------------------------------------------------------------------------------


def _source_folder(root: Path, mode: Mode) -> tuple[Path, dict[str, list[Path]]]:
    """A folder of the photos ingested first (links into the reference folder) and the
    held-back photos per class."""
    held: dict[str, list[Path]] = {}
    for label, paths in _photos().items():
        kept, held[label] = paths[:-HELD_BACK], paths[-HELD_BACK:]
        if mode.per_class is not None:
            kept = kept[: mode.per_class]
        (root / label).mkdir(parents=True)
        for path in kept:
            (root / label / path.name).symlink_to(path)
    return root, held


def _features_metrics(settings: Any, run_id: str) -> dict[str, float]:
    from mlflow import MlflowClient

    metrics = MlflowClient(tracking_uri=settings.resolved_tracking_uri).get_run(run_id).data.metrics
    return {k: v for k, v in sorted(metrics.items()) if k.startswith("features_")}


def _describe(name: str, result: Any, settings: Any) -> None:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    feats = ", ".join(f"{k}={v:g}" for k, v in _features_metrics(settings, result.run_id).items())
    print(
        f"{name}: {result.seconds:6.1f} s on dataset {result.dataset_version}; "
        f"test accuracy {result.metrics['test_accuracy']:.4f}\n"
        f"    phases: {phases}\n"
        f"    MLflow: {feats or 'no features_* metric logged'}",
        flush=True,
    )


def _give_feedback(settings: Any, result: Any, held: dict[str, list[Path]]) -> tuple[int, int]:
    """The held-back photos through the feedback path: the trained model answers each one,
    the user's label is its folder, a reviewer accepts it. Returns (feedback, disagreements)."""
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.core.storage import sha256_hex
    from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord
    from dandelion_lib.data.review import ReviewQueue
    from dandelion_lib.serving.predict import Predictor

    spec = FeatureSpec(labels=tuple(settings.labels))
    predictor = Predictor(model=result.model, spec=spec, version=result.model_version)
    feedback = FeedbackStore.from_settings(settings)
    queue = ReviewQueue(feedback)
    given = disagreements = 0
    try:
        for label, paths in held.items():
            images = [p.read_bytes() for p in paths]
            for path, data, pred in zip(
                paths, images, predictor.predict_bytes(images), strict=True
            ):
                pid = f"bench-{label}-{path.stem}"
                feedback.record_predictions(
                    [
                        PredictionRecord(
                            pid,
                            predictor.decide(pred).label,
                            pred.label,
                            pred.confidence,
                            pred.probabilities,
                            model_name=settings.tracking.model_name,
                            model_version=result.model_version,
                            image_sha256=sha256_hex(data),
                        )
                    ]
                )
                record = feedback.add_feedback(pid, label, data)
                queue.review(record.feedback_id, accepted=True)
                given += 1
                disagreements += not record.agree
    finally:
        feedback.close()
    return given, disagreements


def _retrain(tmp: Path, mode: Mode) -> None:
    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.ingest import add_accepted_feedback, ingest
    from dandelion_lib.lifecycle.train import train
    from dandelion_lib.training.config import TrainConfig

    source, held = _source_folder(tmp / "source", mode)
    settings = Settings(workdir=tmp / "work")
    store = open_store(settings=settings)
    config = TrainConfig()
    if mode.epochs is not None:
        config.epochs = mode.epochs
    if mode.augment_copies is not None:
        config.augment_copies = mode.augment_copies
    print(
        f"store {store.url}; MLflow {settings.resolved_tracking_uri}; "
        f"feedback DB {settings.resolved_feedback_db_url}",
        flush=True,
    )

    start = time.perf_counter()
    first = ingest(settings, source=str(source), store=store, progress=False)
    ingest1_s = time.perf_counter() - start
    print(
        f"ingest (first version):         {ingest1_s:6.1f} s  {first.images} images "
        f"({first.new} new), dataset {first.version}; "
        f"{sum(map(len, held.values()))} photos held back",
        flush=True,
    )
    if next(store.list("features/"), None) is not None:
        raise SystemExit(f"the feature store of {store.url} must start empty")
    full = train(config, settings, store=store, progress=False)
    _describe("full training, empty feature store", full, settings)

    start = time.perf_counter()
    given, disagreements = _give_feedback(settings, full, held)
    feedback_s = time.perf_counter() - start
    print(
        f"feedback: {given} photos predicted, corrected and accepted in {feedback_s:.1f} s "
        f"({disagreements} where the model's answer was wrong)",
        flush=True,
    )
    start = time.perf_counter()
    second = add_accepted_feedback(settings, store=store, progress=False)
    ingest2_s = time.perf_counter() - start
    if second is None:
        raise SystemExit("add_accepted_feedback found no accepted feedback waiting")
    print(
        f"ingest (accepted feedback):     {ingest2_s:6.1f} s  {second.images} images "
        f"({second.new} new), dataset {second.version}",
        flush=True,
    )
    warm = train(config, settings, store=store, progress=False)
    _describe("retraining, warm feature store", warm, settings)
    cold_settings = settings.updated(**{"feature_cache": False})
    control = train(config, cold_settings, store=store, progress=False)
    _describe("control: retraining, DANDELION_FEATURE_CACHE=false", control, settings)

    speedup = full.seconds / warm.seconds
    with_ingest = (ingest1_s + full.seconds) / (ingest2_s + warm.seconds)
    print(
        f"speed-up of the retraining: {speedup:.2f}x the full training "
        f"(target >= {TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
        f"ingest + train: {with_ingest:.2f}x"
    )
    print(
        f"feature store alone (control / warm retraining, same warm process): "
        f"{control.seconds / warm.seconds:.2f}x"
    )
    extract = "extract_features"
    if warm.timings.get(extract, 0) > 0:
        print(
            f"{extract} phase: full {full.timings.get(extract, float('nan')):.1f} s, "
            f"warm {warm.timings[extract]:.1f} s, control "
            f"{control.timings.get(extract, float('nan')):.1f} s "
            f"({full.timings.get(extract, float('nan')) / warm.timings[extract]:.2f}x)"
        )
        rest = warm.seconds - warm.timings[extract]
        print(
            f"retraining outside {extract}: {rest:.1f} s (with no extraction at all the "
            f"speed-up would be at most {full.seconds / rest:.2f}x)"
        )


# --------------------------------------------------------------------------------------
# Part 3: embedding extraction at 1x, 2x, 4x
# --------------------------------------------------------------------------------------


def _variant(data: bytes, copy: int) -> bytes:
    """Copy 0: the photo's bytes; copies 1-3 mirrored, flipped or rotated, re-encoded."""
    if copy == 0:
        return data
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    if copy == 1:
        changed = ImageOps.mirror(rgb)
    elif copy == 2:
        changed = ImageOps.flip(rgb)
    else:
        changed = rgb.transpose(Image.Transpose.ROTATE_90)
    out = io.BytesIO()
    changed.save(out, "JPEG", quality=90)
    return out.getvalue()


def _scaled_images(mode: Mode) -> tuple[list[bytes], int]:
    """max(scales) x the base set as distinct image bytes (copy k of every photo after
    copy k - 1 of all of them, so the first n x base images are the n x set)."""
    photos = _photos()
    base = [p for label in LABELS for p in photos[label]]
    if mode.scale_base is not None:
        half = mode.scale_base // 2
        base = [p for label in LABELS for p in photos[label][:half]]
    originals = [p.read_bytes() for p in base]
    images = [_variant(d, copy) for copy in range(max(mode.scales)) for d in originals]
    return images, len(originals)


def _extraction(tmp: Path, mode: Mode) -> None:
    import numpy as np

    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.features import FeatureSpec, bytes_to_model_input
    from dandelion_lib.core.storage import open_store, sha256_hex
    from dandelion_lib.lifecycle.extractor import feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.extraction import open_feature_store, split_features

    start = time.perf_counter()
    images, base = _scaled_images(mode)
    shas = [sha256_hex(d) for d in images]
    if len(set(shas)) != len(shas):
        raise SystemExit("the scaled image set repeats bytes: every copy must be a new sha256")
    settings = Settings(workdir=tmp / "extract")
    spec = FeatureSpec(labels=tuple(settings.labels))
    with ThreadPoolExecutor(max_workers=2) as pool:
        pixels = np.stack(
            list(pool.map(lambda d: bytes_to_model_input(d, spec).astype(np.uint8), images))
        )
    config = TrainConfig()
    backbone = model_lib.build_backbone(config.backbone, config.weights, spec.image_size)
    backbone.model.trainable = False
    extractor = feature_extractor(backbone, settings)
    dim = backbone.feature_dim
    extractor(pixels[:8].astype(np.float32))  # convert (or trace) once, on real photos
    print(
        f"{len(images)} distinct images ({base} photos x {max(mode.scales)} copies) decoded "
        f"to {spec.image_size}x{spec.image_size} and backbone ready in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )

    def fresh_store(name: str) -> Any:
        url = (tmp / "extract" / name).as_uri()
        return open_feature_store(open_store(settings, url), spec, backbone)

    def run(fstore: Any, n: int) -> tuple[float, dict[str, int]]:
        counts: dict[str, int] = {}
        began = time.perf_counter()
        split_features(extractor, pixels[:n], shas[:n], dim, fstore, counts)
        return time.perf_counter() - began, counts

    nostore_s, _ = run(None, base)
    print(f"1x without feature store:  {nostore_s:7.1f} s  {base / nostore_s:6.1f} images/s")
    cold: dict[int, float] = {}
    warm = fresh_store("warm")
    for scale in mode.scales:
        n = scale * base
        fstore = warm if scale == 1 else fresh_store(f"cold-{scale}x")
        cold[scale], counts = run(fstore, n)
        ratio = (
            "" if scale == 1 else f"  {cold[scale] / cold[1]:.2f}x the 1x time (linear: {scale})"
        )
        print(
            f"{scale}x cold ({n:5d} images):  {cold[scale]:7.1f} s  {n / cold[scale]:6.1f} images/s"
            f"  computed {counts.get('features_computed', 0)}{ratio}",
            flush=True,
        )
    print(f"1x into the feature store takes {cold[1] / nostore_s:.2f}x the time without one")
    previous = mode.scales[0]
    for scale in mode.scales[1:]:
        n = scale * base
        took, counts = run(warm, n)
        new = counts.get("features_computed", 0)
        per_new = cold[1] / base
        print(
            f"{previous}x warm -> {scale}x:  {took:7.1f} s  computed {new}, read "
            f"{counts.get('features_cached', 0)} from the store; {took / max(new, 1) * 1000:.1f} ms "
            f"per new image (cold 1x: {per_new * 1000:.1f} ms); {scale}x cold took "
            f"{cold[scale] / took:.2f}x as long",
            flush=True,
        )
        previous = scale
    top = max(mode.scales) * base
    took, counts = run(warm, top)
    print(
        f"{max(mode.scales)}x fully cached re-read: {took:7.1f} s  computed "
        f"{counts.get('features_computed', 0)}, read {counts.get('features_cached', 0)} "
        f"({cold[max(mode.scales)] / took:.1f}x faster than cold)"
    )


def main(*args: str) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    modes = {"full": FULL, "quick": QUICK}
    unknown = [a for a in args if a not in modes]
    if unknown:
        print(f"retrain: unknown argument(s) {unknown}; use 'quick' or nothing (full run)")
        return 2
    mode = modes[args[-1]] if args else FULL
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"mode: {mode.name}; {os.cpu_count()} CPUs, load average {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as name:
        tmp = Path(name)
        print("\n-- full training vs retraining after accepted feedback --", flush=True)
        _retrain(tmp, mode)
        print("\n-- embedding extraction at scale --", flush=True)
        _extraction(tmp, mode)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end: {load} (other work on the machine skews the figures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
