"""Several labelled sources in one dataset version: each image records its origin, the splits
are stratified by source and class, the report counts per source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest
from dandelion_lib.data.rejections import IngestError
from tests.integration.test_ingest_folder import _cli, _copy

D, G = "dandelion", "grass"


@pytest.fixture
def two_folders(greenr_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``greenr/`` with 40 real photos per label, ``photos/lawn/`` with 25 others, plus one
    photo that is in both."""
    greenr, lawn = tmp_path / "greenr", tmp_path / "photos" / "lawn"
    for label in (D, G):
        _copy(greenr_dir, greenr, label, range(40))
        _copy(greenr_dir, lawn, label, range(100, 125))
    shutil.copy(greenr / D / "00000007.jpg", lawn / D / "also-in-greenr.jpg")
    return greenr, lawn


def _settings(tmp_path: Path, source: str, **kw: object) -> Settings:
    return Settings(workdir=tmp_path / "work", source=source, **kw)  # type: ignore[arg-type]


def test_two_folders_one_version_each_image_with_its_origin(
    two_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    greenr, lawn = two_folders
    store = LocalStore(tmp_path / "store")
    settings = _settings(tmp_path, f"{greenr},mine={lawn}")
    report = ingest(settings, store=store, progress=False)
    df = dataset.load_manifest(store, report.version)

    assert report.images == len(df) == 2 * 40 + 2 * 25 and report.duplicates == 1
    assert df.groupby("origin")["label"].value_counts().to_dict() == {
        ("greenr", D): 40,
        ("greenr", G): 40,
        ("mine", D): 25,
        ("mine", G): 25,
    }
    assert df[df["origin"] == "mine"]["source"].str.startswith(str(lawn)).all()
    # the duplicate keeps the first listed source's origin and path
    dup = df[df["source"].str.endswith("00000007.jpg") & (df["label"] == D)]
    assert dup["origin"].tolist() == ["greenr"] and len(dup) == 1

    # stratified by (origin, label): every source's part of every class has all three
    # splits, its test part about 15% of it
    for (origin, label), rows in df.groupby(["origin", "label"]):
        assert set(rows["split"]) == set(dataset.SPLITS), (origin, label)
        assert abs((rows["split"] == "test").sum() - 0.15 * len(rows)) <= 1, (origin, label)

    # per-source counts: the report, its summary, the stored report
    assert report.origins["mine"][G] == {"total": 25, **_splits(df, "mine", G)}
    assert set(report.origins) == {"greenr", "mine"}
    text = report.summary()
    assert "  per source:" in text and "    mine: dandelion 25 (train " in text
    stored = dataset.load_report(store, report.version)
    assert stored["origins"] == json.loads(json.dumps(report.origins))

    # the same sources again: the same version, nothing new
    again = ingest(settings, store=store, progress=False)
    assert (again.version, again.created, again.new) == (report.version, False, 0)


def _splits(df: pd.DataFrame, origin: str, label: str) -> dict[str, int]:
    rows = df[(df["origin"] == origin) & (df["label"] == label)]
    return {s: int((rows["split"] == s).sum()) for s in dataset.SPLITS}


def test_the_first_listed_source_keeps_a_shared_photo(
    two_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    greenr, lawn = two_folders
    report = ingest(
        _settings(tmp_path, f"lawn={lawn},{greenr}"),
        store=LocalStore(tmp_path / "store"),
        progress=False,
    )
    df = dataset.load_manifest(LocalStore(tmp_path / "store"), report.version)
    shared = df[df["source"].str.endswith("also-in-greenr.jpg")]
    assert shared["origin"].tolist() == ["lawn"]
    assert not df["source"].str.endswith(f"{D}/00000007.jpg").any()


def test_duplicate_names_are_a_one_line_error(
    two_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    greenr, lawn = two_folders
    other = tmp_path / "elsewhere" / "lawn"
    other.mkdir(parents=True)
    with pytest.raises(IngestError, match="two sources are named 'lawn'"):
        ingest(_settings(tmp_path, f"{lawn},{other}"), store=LocalStore(tmp_path / "s"))
    bad = _cli(tmp_path, "--source", f"{greenr},greenr={lawn}")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "two sources are named 'greenr'" in bad.stderr


def test_a_store_from_before_origins_gets_new_images_with_theirs(
    two_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """A version written before origins were recorded reads with the origin ``default``;
    ingesting again (the old source and a new one) keeps every earlier image's split."""
    greenr, lawn = two_folders
    store = LocalStore(tmp_path / "store")
    first = ingest(_settings(tmp_path, str(greenr)), store=store, progress=False)
    old = dataset.load_manifest(store, first.version).drop(columns=["origin"])
    store.put_bytes(dataset.manifest_key("00000000000000aa"), dataset.manifest_to_parquet(old))
    store.put_json(dataset.LATEST_KEY, {"version": "00000000000000aa"})
    assert set(dataset.load_manifest(store)["origin"]) == {dataset.LEGACY_ORIGIN}

    later = ingest(_settings(tmp_path, f"{greenr},mine={lawn}"), store=store, progress=False)
    df = dataset.load_manifest(store, later.version)
    before = dict(zip(old["sha256"], old["split"], strict=True))
    assert {s: sp for s, sp in zip(df["sha256"], df["split"], strict=True) if s in before} == (
        before
    )
    assert set(df["origin"]) == {"greenr", "mine"}
