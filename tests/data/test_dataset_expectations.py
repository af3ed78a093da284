"""Expectations on the ingested dataset: schema, labels, balance, split hygiene."""

from __future__ import annotations

import pandas as pd
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import STAT_COLUMNS
from dandelion_lib.core.storage import LocalStore, sha256_hex
from dandelion_lib.data import dataset


def test_schema(manifest: pd.DataFrame) -> None:
    assert tuple(manifest.columns) == dataset.MANIFEST_COLUMNS
    assert manifest.notna().all().all()
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert manifest["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (manifest["key"] == "raw/" + manifest["label"] + "/" + manifest["sha256"] + ".jpg").all()
    assert manifest["sha256"].is_unique and manifest["key"].is_unique
    assert set(manifest["split"]) == set(dataset.SPLITS)
    assert set(manifest["format"]) == {"JPEG"}
    assert (manifest["bytes"] > 0).all()


def test_image_sizes_and_statistics_in_range(
    manifest: pd.DataFrame, data_settings: Settings
) -> None:
    assert (manifest[["width", "height"]] >= data_settings.images.min_image_side).all().all()
    assert (manifest["width"] * manifest["height"] <= data_settings.images.max_image_pixels).all()
    stats = manifest[list(STAT_COLUMNS)]
    assert ((stats >= 0) & (stats <= 1)).all().all()
    assert (stats.std() > 0).all(), "a statistic is constant over the dataset"


def test_one_source_splits_as_by_label_alone(
    manifest: pd.DataFrame, data_settings: Settings
) -> None:
    """The reference set alone: one origin, split exactly as stratified by label only."""
    assert manifest["origin"].nunique() == 1
    labels, groups = manifest["label"].tolist(), manifest["group"].tolist()
    seed = data_settings.ingest.split_seed
    assert manifest["split"].tolist() == dataset.assign_splits(labels, groups, seed)


def test_label_set(manifest: pd.DataFrame, data_settings: Settings) -> None:
    assert set(manifest["label"]) == set(data_settings.labels) == {"dandelion", "grass"}


def test_class_balance(manifest: pd.DataFrame, data_settings: Settings) -> None:
    counts = manifest["label"].value_counts()
    assert counts.min() >= data_settings.ingest.min_images_per_class
    assert counts.max() / counts.min() <= data_settings.ingest.max_class_imbalance
    assert counts.to_dict() == {"dandelion": 200, "grass": 200}


@pytest.mark.parametrize("column", ["sha256", "group"])
def test_nothing_shared_across_splits(manifest: pd.DataFrame, column: str) -> None:
    splits_per_value = manifest.groupby(column)["split"].nunique()
    assert (splits_per_value == 1).all()


def test_split_proportions_per_label(manifest: pd.DataFrame) -> None:
    largest_group = manifest["group"].value_counts().max()
    for _, rows in manifest.groupby("label"):
        counts = rows["split"].value_counts()
        for split, frac in dataset.SPLIT_FRACTIONS.items():
            assert abs(counts[split] - frac * len(rows)) <= largest_group


def test_raw_objects_match_their_checksums(manifest: pd.DataFrame, data_store: LocalStore) -> None:
    for key, sha in zip(manifest["key"], manifest["sha256"], strict=True):
        assert sha256_hex(data_store.get_bytes(key)) == sha
