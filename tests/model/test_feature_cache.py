"""Training through the feature store: a second training on the same dataset computes no
unaugmented feature and fits the same head; an image missing from the cache is the only
one computed; other backbone weights are another key.

The corrupt-shard and cache-off trainings are marked slow (``tests/unit/test_featurestore.py``
covers corrupt shards on both store backends in the default run). Each test trains on a
copy of the model tests' store (images and manifests, without ``features/``), so what is
cached is only what these trainings wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from dandelion_lib.core.storage import LocalStore, open_store
from dandelion_lib.data.featurestore import FeatureStore
from tests.model.conftest import tiny_config
from tests.store_support import CountingStore

PER_CLASS = 6
"""Images per class and split: 36 in all."""


@pytest.fixture
def copied_store(model_env: Any, tmp_path: Path) -> Any:
    src = Path(model_env.store.root)
    dst = tmp_path / "store"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("features"))
    return open_store(model_env.settings, dst.as_uri())


def _train(model_env: Any, store: Any, **changes: Any) -> tuple[Any, dict[str, float], str]:
    from dandelion_lib.lifecycle.train import train

    fields = {"augment": False, "epochs": 40, "register": False, "openset_method": "none"}
    config = tiny_config(max_images_per_class=PER_CLASS, **(fields | changes))
    result = train(config, model_env.settings, store=store, progress=False)
    run = MlflowClient().get_run(result.run_id)
    return result, run.data.metrics, run.data.params["feature_store_key"]


def test_second_training_reads_every_feature_and_fits_the_same_head(
    model_env: Any, copied_store: Any
) -> None:
    first, m1, key = _train(model_env, copied_store)
    assert (m1["features_cached"], m1["features_computed"]) == (0, 6 * PER_CLASS)
    assert isinstance(copied_store, LocalStore)
    assert any(copied_store.list(f"features/{key}/manifests/"))

    second, m2, key2 = _train(model_env, copied_store)
    assert key2 == key
    assert (m2["features_cached"], m2["features_computed"]) == (6 * PER_CLASS, 0)
    np.testing.assert_allclose(second.history["loss"], first.history["loss"], atol=1e-5)
    assert second.metrics["test_accuracy"] == pytest.approx(first.metrics["test_accuracy"])

    # Keep every cached embedding but one: only that image is computed again.
    fs = FeatureStore(copied_store, key)
    rows = [tuple(r) for r in fs.index()]
    shas = [sha for sha, _ in rows]
    found, missing = fs.get(shas)
    assert missing == [] and found is not None
    for name in list(copied_store.list(f"features/{key}/")):
        if name.endswith(".npz") or "/manifests/" in name:
            copied_store.delete(name)
    fs.put(shas[1:], "none", found[1:])
    third, m3, _ = _train(model_env, copied_store)
    assert (m3["features_cached"], m3["features_computed"]) == (6 * PER_CLASS - 1, 1)
    np.testing.assert_allclose(third.history["loss"], first.history["loss"], atol=1e-5)


@pytest.mark.slow
def test_a_corrupt_shard_is_recomputed_during_training(model_env: Any, copied_store: Any) -> None:
    first, _, key = _train(model_env, copied_store)
    root = Path(copied_store.root) / "features" / key / "shards"
    shard = sorted(root.glob("*.npz"))[0]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    second, m2, _ = _train(model_env, copied_store)
    assert m2["features_computed"] > 0
    assert m2["features_cached"] + m2["features_computed"] == 6 * PER_CLASS
    np.testing.assert_allclose(second.history["loss"], first.history["loss"], atol=1e-5)


@pytest.mark.slow
def test_the_cache_can_be_turned_off(model_env: Any, copied_store: Any) -> None:
    from dandelion_lib.lifecycle.train import train

    # also: the settings given to train() choose the extraction runtime (not the process's)
    update = {"feature_cache": False, "extraction_runtime": "keras"}
    settings = model_env.settings.updated(**update)
    config = tiny_config(
        max_images_per_class=PER_CLASS,
        augment=False,
        epochs=5,
        register=False,
        openset_method="none",
    )
    result = train(config, settings, store=copied_store, progress=False)
    run = MlflowClient().get_run(result.run_id).data
    metrics = run.metrics
    assert (metrics["features_cached"], metrics["features_computed"]) == (0, 6 * PER_CLASS)
    assert not any(copied_store.list("features/"))
    assert (
        run.tags["extraction_runtime"] == "keras" and "extraction_onnx_max_abs_diff" not in metrics
    )


def test_other_backbone_weights_are_another_key(model_env: Any) -> None:
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.training.extraction import open_feature_store
    from dandelion_lib.training.model import build_backbone

    spec = FeatureSpec(labels=("dandelion", "grass"))
    backbone = build_backbone("efficientnet_lite0")
    key = open_feature_store(model_env.store, spec, backbone).key
    assert open_feature_store(model_env.store, spec, backbone).key == key
    weights = backbone.model.get_weights()
    weights[-1] = weights[-1] + 1e-3
    backbone.model.set_weights(weights)
    assert open_feature_store(model_env.store, spec, backbone).key != key
    other_spec = FeatureSpec(labels=("dandelion", "grass"), image_size=spec.image_size + 32)
    assert open_feature_store(model_env.store, other_spec, backbone).key != key


@pytest.mark.slow  # three trainings; the sharded test below covers the same cache in the default run
def test_augmented_views_are_cached_per_image(model_env: Any, copied_store: Any) -> None:
    """With augmentation on, a second training computes no feature at all, and an image
    missing from the cache has only its own views computed again."""
    changes = {"augment": True, "augment_copies": 2, "epochs": 10}
    train_images = 2 * PER_CLASS
    first, m1, key = _train(model_env, copied_store, **changes)
    assert m1["features_computed_augmented"] == 2 * train_images
    assert (m1["features_cached"], m1["features_computed"]) == (0, 6 * PER_CLASS + 2 * train_images)

    second, m2, _ = _train(model_env, copied_store, **changes)
    assert (m2["features_cached"], m2["features_computed"]) == (6 * PER_CLASS + 2 * train_images, 0)
    np.testing.assert_allclose(second.history["loss"], first.history["loss"], atol=1e-5)

    # Forget one training image in every view: it alone is extracted again (3 views).
    fs = FeatureStore(copied_store, key)
    index = fs.index()
    views = sorted({view for _, view in index})
    assert len(views) == 3 and "none" in views
    kept: dict[str, tuple[list[str], Any]] = {}
    for view in views:
        shas = sorted(sha for sha, v in index if v == view)
        found, _ = fs.get(shas, view)
        kept[view] = (shas, found)
    dropped = kept[views[0]][0][0]  # "aug0-…": a training image (augmented views are train only)
    for name in list(copied_store.list(f"features/{key}/")):
        if name.endswith(".npz") or "/manifests/" in name:
            copied_store.delete(name)
    for view, (shas, found) in kept.items():
        rows = [i for i, sha in enumerate(shas) if sha != dropped]
        fs.put([shas[i] for i in rows], view, found[rows])
    third, m3, _ = _train(model_env, copied_store, **changes)
    assert m3["features_computed"] == 3
    assert m3["features_computed_augmented"] == 2
    # one image extracted in a batch of its own: equal up to float rounding
    np.testing.assert_allclose(third.history["loss"], first.history["loss"], rtol=1e-5)


def test_augmented_views_depend_on_the_image_alone(model_env: Any) -> None:
    """A view is a function of the image, the seed, the view number and the augmentation
    parameters (not of its batch or position), so it can be cached under its name."""
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.data.dataset import load_examples
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.extraction import augment_views, augmented_view_name

    rows = model_env.manifest[model_env.manifest["split"] == "train"].head(4)
    pixels = load_examples(model_env.store, rows, FeatureSpec(labels=("dandelion", "grass")))
    shas = [str(s) for s in rows["sha256"]]

    def view(config: TrainConfig, copy: int, pick: slice = slice(None)) -> Any:
        return np.concatenate(list(augment_views(pixels[pick], shas[pick], copy, config)))

    off = TrainConfig(flip=False, rotation=0, zoom=0, brightness=0, contrast=0)
    np.testing.assert_array_equal(view(off, 0), pixels.astype(np.float32))
    config = TrainConfig()
    all_four = view(config, 1)
    assert np.abs(all_four - pixels).mean() > 5  # it does transform the images
    np.testing.assert_array_equal(all_four[2:], view(config, 1, slice(2, None)))
    assert np.abs(all_four - view(config, 2)).mean() > 5
    names = {augmented_view_name(c, k) for c in (config, TrainConfig(seed=1)) for k in (0, 1)}
    names.add(augmented_view_name(TrainConfig(rotation=0.05), 0))
    assert len(names) == 5 and "none" not in names


def test_sharded_extraction_fills_what_training_reads(model_env: Any, copied_store: Any) -> None:
    """The DAGs' mapped extract_features tasks: each shard puts its images' views into the
    feature store (the shards cover every image once); training then computes nothing."""
    from dandelion_lib.lifecycle.extract import extract_shard_range, plan_extraction
    from dandelion_lib.training.extraction import feature_shards

    settings = model_env.settings.updated(**{"feature_shard_size": 10})
    fields = {"augment": True, "augment_copies": 1, "epochs": 5, "register": False}
    config = tiny_config(max_images_per_class=PER_CLASS, openset_method="none", **fields)
    shards = feature_shards(config, settings, store=copied_store)
    assert shards == 4  # 36 images, 10 per shard
    counts = [
        extract_shard_range(config, i, i + 1, settings, store=copied_store) for i in range(shards)
    ]
    assert [c["images"] for c in counts] == [10, 10, 10, 6]
    assert sum(c["features_computed_augmented"] for c in counts) == 2 * PER_CLASS
    assert sum(c["features_computed"] for c in counts) == 6 * PER_CLASS + 2 * PER_CLASS
    again = extract_shard_range(config, 1, 2, settings, store=copied_store)
    assert again["features_computed"] == 0 and again["features_cached"] == 10 + again.get(
        "features_cached_augmented", 0
    )

    # a mapped task of several shards (the plan's groups) reads the version once, same counts
    assert plan_extraction(config, settings.updated(feature_max_tasks=3), store=copied_store) == [
        (0, 2),
        (2, 3),
        (3, 4),
    ]
    whole = extract_shard_range(config, 0, shards, settings, store=copied_store)
    assert whole["images"] == 36 and whole["features_computed"] == 0

    from dandelion_lib.lifecycle.train import train

    result = train(config, settings, store=copied_store, progress=False)
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert metrics["features_computed"] == 0
    assert metrics["features_cached"] == 6 * PER_CLASS + 2 * PER_CLASS
    off = settings.updated(**{"feature_cache": False})
    assert feature_shards(config, off, store=copied_store) == 1
    assert extract_shard_range(config, 0, 1, off, store=copied_store) == {}


class _CountingStore:
    """The model tests' real store, counting the images it reads."""

    def __init__(self, store: Any) -> None:
        self.store, self.reads = store, 0

    def get_bytes(self, key: str) -> bytes:
        self.reads += 1
        return bytes(self.store.get_bytes(key))


def test_stored_pixels_read_only_what_a_step_walks(model_env: Any, monkeypatch: Any) -> None:
    """A split's model inputs are read from the store per slice, never all at once: the
    same images as one array, the same shuffled batches for fine-tuning, and the same
    features when extraction walks them a chunk at a time."""
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.data.dataset import load_examples
    from dandelion_lib.training import extraction
    from dandelion_lib.training.inputs import StoredPixels

    spec = FeatureSpec(labels=("dandelion", "grass"))
    rows = model_env.manifest[model_env.manifest["split"] == "train"].head(10)
    array = load_examples(model_env.store, rows, spec)
    counting = _CountingStore(model_env.store)
    stored = StoredPixels(counting, rows, spec)
    assert len(stored) == 10 and stored.shape == array.shape and counting.reads == 0
    np.testing.assert_array_equal(stored[2:5], array[2:5])
    np.testing.assert_array_equal(stored[7], array[7])
    np.testing.assert_array_equal(stored.take(slice(6, 8))[[1]], array[[7]])
    assert counting.reads == 3 + 1 + 1
    y = np.arange(10) % 2

    def batches(pixels: Any) -> list[Any]:
        ds = extraction.make_dataset(pixels, y, batch_size=4, shuffle_seed=3)
        return [(x.numpy(), t.numpy()) for x, t in ds]

    for (a, ta), (b, tb) in zip(batches(array), batches(stored), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)

    backbone = tiny_model_backbone(spec.image_size)
    whole = extraction.extract_features(backbone, array, 64)
    monkeypatch.setattr(extraction, "CHUNK", 3)  # 10 images in 4 reads
    counting.reads = 0
    np.testing.assert_allclose(extraction.extract_features(backbone, stored, 64), whole, atol=1e-5)
    assert counting.reads == 10


def tiny_model_backbone(size: int) -> Any:
    """The stand-in backbone's graph as an extractor (float32 inputs -> 64 features)."""
    from dandelion_lib.training import model as model_lib

    backbone = model_lib.build_backbone("stand_in", "imagenet", size)
    return lambda batch: backbone.model(batch, training=False)


def _task_requests(model_env: Any, store: Any, per_class: int, run_id: str) -> list[dict[str, int]]:
    """Plan the DAG's extraction (one 3-image shard per task) and run every task; the
    requests each task made to the store."""
    from dandelion_lib.lifecycle.extract import extract_part, write_plan

    settings = model_env.settings.updated(**{"feature_shard_size": 3, "feature_max_tasks": 64})
    config = tiny_config(max_images_per_class=per_class, openset_method="none", augment=False)
    counting = CountingStore(store)
    tasks = write_plan(config, settings, run_id, store=counting)
    assert len(tasks) == 6 * per_class // 3
    out = []
    for task in tasks:
        counting.reset()
        counts = extract_part(config, task["part"], task["index"], settings, store=counting)
        assert counts["images"] == 3
        assert not [k for k in counting.read_keys if "/manifests/" in k]
        out.append({k: counting.calls[k] for k in ("get", "list", "info")})  # the reads
    return out


def test_extraction_tasks_read_the_same_at_any_number_of_shards(
    model_env: Any, copied_store: Any, tmp_path: Path
) -> None:
    """A mapped task reads its part of the plan and one compacted feature index (and, when it
    extracts, the backbone converted by the store's first task): as many requests with 6
    shards as with 12, on a cold store and when everything is cached."""
    small_store = open_store(model_env.settings, (tmp_path / "small").as_uri())
    shutil.copytree(Path(copied_store.root), tmp_path / "small")
    for run in ("cold", "warm"):
        small = _task_requests(model_env, small_store, 3, run)  # 18 images: 6 shards
        large = _task_requests(model_env, copied_store, 6, run)  # 36 images: 12 shards
        if run == "cold":  # each store's first task finds no converted backbone (one read)
            assert small[0]["get"] == small[1]["get"] - 1 == large[0]["get"] == large[1]["get"] - 1
            small[0]["get"] += 1  # and stores it; every later task reads it (two reads)
            large[0]["get"] += 1
        every = small + large
        assert all(calls == every[0] for calls in every), (run, every)
        assert every[0]["list"] == 0
    # warm: the part, the compacted index and the one feature shard holding its rows
    assert every[0]["get"] == 3
