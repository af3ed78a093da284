"""Dataset versions: near-duplicate groups, the split, version ids, immutability, reading."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dandelion_lib.core.features import STAT_COLUMNS, hash_distance, perceptual_hash
from dandelion_lib.core.images import decode_image
from dandelion_lib.core.storage import LocalStore, ObjectStore
from dandelion_lib.data import dataset


def _sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _records(n_per_label: int, labels: tuple[str, ...] = ("dandelion", "grass")) -> list[dict]:
    rows = []
    for label in labels:
        for i in range(n_per_label):
            sha = _sha(f"{label}{i}")
            rows.append(
                {
                    "sha256": sha,
                    "label": label,
                    "key": f"raw/{label}/{sha}.jpg",
                    "source": f"/src/{label}/{i}.jpg",
                    "width": 100,
                    "height": 80,
                    "format": "JPEG",
                    "bytes": 1000 + i,
                    "ingested_at": "2025-01-01T00:00:00+00:00",
                    "phash": _sha(sha)[:16],
                    **dict.fromkeys(STAT_COLUMNS, 0.5),
                }
            )
    return rows


def test_split_is_stratified_70_15_15_and_deterministic() -> None:
    labels = ["a"] * 200 + ["b"] * 100
    groups = [_sha(i)[:16] for i in range(300)]
    splits = dataset.assign_splits(labels, groups, seed=42)
    df = pd.DataFrame({"label": labels, "split": splits})
    counts = df.groupby(["label", "split"]).size().to_dict()
    assert counts == {
        ("a", "train"): 140, ("a", "val"): 30, ("a", "test"): 30,
        ("b", "train"): 70, ("b", "val"): 15, ("b", "test"): 15,
    }  # fmt: skip
    assert dataset.assign_splits(labels, groups, seed=42) == splits
    assert dataset.assign_splits(labels, groups, seed=43) != splits


def test_groups_never_straddle_splits() -> None:
    labels = ["a"] * 100
    groups = [_sha(i // 4)[:16] for i in range(100)]  # 25 groups of 4
    splits = dataset.assign_splits(labels, groups, seed=1)
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert set(splits) == {"train", "val", "test"}


def test_adding_an_image_moves_few_others() -> None:
    groups = [_sha(i)[:16] for i in range(200)]
    before = dataset.assign_splits(["a"] * 200, groups, seed=42)
    after = dataset.assign_splits(["a"] * 201, [*groups, _sha("new")[:16]], seed=42)
    moved = sum(b != a for b, a in zip(before, after[:200], strict=True))
    assert moved <= 2


def test_near_duplicate_groups_are_transitive_and_thresholded() -> None:
    shas = [_sha(i) for i in range(4)]
    # 0 and 1 differ by 4 bits, 1 and 2 by 4 bits (0-2 by 8), 3 is far from all
    phashes = ["0000000000000000", "000000000000000f", "00000000000000ff", "ffffffffffffffff"]
    groups = dataset.near_duplicate_groups(shas, phashes, max_distance=4)
    assert groups[0] == groups[1] == groups[2] == min(shas[:3])[:16]
    assert groups[3] == shas[3][:16]
    assert len(set(dataset.near_duplicate_groups(shas, phashes, max_distance=3))) == 4
    assert len(set(dataset.near_duplicate_groups(shas, phashes, max_distance=-1))) == 4


def test_perceptual_hash_finds_resized_copies(greenr_dir: Path) -> None:
    paths = sorted((greenr_dir / "grass").glob("*.jpg"))[:20]
    images = [decode_image(p.read_bytes()) for p in paths]
    hashes = [perceptual_hash(img) for img in images]
    copy = io.BytesIO()
    images[0].resize((images[0].width // 2, images[0].height // 2)).save(copy, "JPEG", quality=50)
    assert hash_distance(hashes[0], perceptual_hash(Image.open(copy))) <= 8
    assert min(hash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 8


def test_version_depends_on_content_not_provenance_or_order() -> None:
    df = dataset.build_manifest(_records(20), seed=42, near_duplicate_distance=8)
    v = dataset.compute_version(df)
    assert len(v) == 16 and int(v, 16) >= 0
    shuffled = df.sample(frac=1, random_state=0)
    shuffled["source"] = "https://elsewhere/" + shuffled["sha256"]
    shuffled["ingested_at"] = pd.Timestamp("2030-01-01", tz="UTC")
    assert dataset.compute_version(shuffled) == v
    relabelled = df.copy()
    relabelled.loc[0, "label"] = "grass"
    assert dataset.compute_version(relabelled) != v
    assert dataset.compute_version(df.iloc[1:]) != v


def test_versions_are_immutable_and_pointer_moves(store: ObjectStore) -> None:
    df = dataset.build_manifest(_records(20), seed=42, near_duplicate_distance=8)
    v1, created = dataset.write_version(store, df, {"note": "first"})
    assert created and dataset.latest_version(store) == v1
    assert store.get_json(dataset.LATEST_KEY) == {"version": v1}
    assert dataset.load_report(store)["note"] == "first"
    other = dataset.build_manifest(_records(21), seed=42, near_duplicate_distance=8)
    v2, _ = dataset.write_version(store, other)
    assert dataset.latest_version(store) == v2 != v1
    # Same content again (different provenance): the stored manifest is not rewritten.
    again = df.copy()
    again["source"] = "elsewhere"
    v3, created = dataset.write_version(store, again)
    assert (v3, created) == (v1, False)
    assert (dataset.load_manifest(store, v1)["source"] != "elsewhere").all()
    assert dataset.latest_version(store) == v1
    assert dataset.list_versions(store) == sorted([v1, v2])
    loaded = dataset.load_manifest(store)
    assert loaded.attrs["version"] == v1
    pd.testing.assert_frame_equal(loaded, dataset.normalize_manifest(df))


def test_reading_errors_are_one_line(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(dataset.DatasetNotFoundError, match=r"no dataset in .*dandelion ingest"):
        dataset.latest_version(store)
    with pytest.raises(dataset.DatasetNotFoundError, match="not a dataset version"):
        dataset.load_manifest(store, "../etc")
    with pytest.raises(dataset.DatasetNotFoundError, match="no dataset version 0123456789abcdef"):
        dataset.load_manifest(store, "0123456789abcdef")
    store.put_json(dataset.LATEST_KEY, {"version": 3})
    with pytest.raises(dataset.DatasetError, match="not a valid pointer"):
        dataset.latest_version(store)


def test_manifest_schema_is_enforced() -> None:
    df = dataset.build_manifest(_records(5), seed=0, near_duplicate_distance=8)
    assert tuple(df.columns) == dataset.MANIFEST_COLUMNS
    assert str(df["ingested_at"].dt.tz) == "UTC" and df["width"].dtype == "int64"
    with pytest.raises(dataset.DatasetError, match="lacks columns"):
        dataset.normalize_manifest(df.drop(columns=["phash"]))


def test_ingestion_times_with_and_without_microseconds_mix() -> None:
    """``isoformat()`` drops a zero microsecond part: one manifest can hold both forms."""
    rows = _records(3)
    rows[0]["ingested_at"] = "2026-11-30T15:24:01.123456+00:00"
    rows[1]["ingested_at"] = "2026-11-30T15:24:01+00:00"
    df = dataset.build_manifest(rows, seed=0, near_duplicate_distance=8)
    times = dict(zip(df["sha256"], df["ingested_at"], strict=True))
    assert times[rows[0]["sha256"]] == pd.Timestamp("2026-11-30T15:24:01.123456Z")
    assert times[rows[1]["sha256"]] == pd.Timestamp("2026-11-30T15:24:01Z")


def test_negatives_split_by_kind_and_keep_near_duplicates_together() -> None:
    from dandelion_lib.core.labels import UNKNOWN

    neg = []
    for kind in ("objects", "daisy"):
        for i in range(10):
            sha = _sha(f"{kind}{i}")
            neg.append(
                {**_records(1)[0], "sha256": sha, "label": UNKNOWN, "key": f"raw/unknown/{sha}.jpg"}
                | {"source": f"/ood/{kind}/{i}.jpg", "phash": _sha(sha)[:16]}
            )
    # two near-identical daisies (same perceptual hash): one group, one split
    neg[-1]["phash"] = neg[-2]["phash"]
    df = dataset.build_manifest(_records(20) + neg, seed=1, near_duplicate_distance=0)
    n = df[df["label"] == UNKNOWN]
    assert set(n["split"]) == {"train", "test"}  # never val
    per_kind = n.groupby(n["source"].map(dataset.negative_kind))["split"].value_counts()
    assert per_kind.unstack().min().min() >= 4  # about half of each kind on each side
    assert n.groupby("group")["split"].nunique().max() == 1
    assert set(df[df["label"] != UNKNOWN]["split"]) == {"train", "val", "test"}
    assert dataset.negative_kind("feedback:1234") == "feedback"


def _negatives(n: int, prefix: str = "ood") -> list[dict]:
    from dandelion_lib.core.labels import UNKNOWN

    rows = []
    for i in range(n):
        sha = _sha(f"{prefix}{i}")
        rows.append(
            {**_records(1)[0], "sha256": sha, "label": UNKNOWN, "key": f"raw/unknown/{sha}.jpg"}
            | {"source": f"/ood/objects/{prefix}{i}.jpg", "phash": _sha(sha)[:16]}
        )
    return rows


def test_a_later_version_only_adds_every_image_keeps_its_split() -> None:
    """Stable splits: with the previous manifest, its images (and negatives) keep their split,
    even where a fresh split of the larger set would move them; the new images are split
    70/15/15 among themselves; the same content again gives the same version."""
    first = dataset.build_manifest(
        _records(40) + _negatives(10), seed=42, near_duplicate_distance=0
    )
    more = _records(60) + _negatives(16)  # 20 new images per label, 6 new negatives
    fresh = dataset.build_manifest(more, seed=42, near_duplicate_distance=0)
    later = dataset.build_manifest(more, seed=42, near_duplicate_distance=0, previous=first)

    before = dict(zip(first["sha256"], first["split"], strict=True))
    after = dict(zip(later["sha256"], later["split"], strict=True))
    assert {sha: after[sha] for sha in before} == before
    fresh_split = dict(zip(fresh["sha256"], fresh["split"], strict=True))
    assert any(fresh_split[sha] != split for sha, split in before.items())  # it would move
    new = later[~later["sha256"].isin(list(before))]
    classes = new[new["label"] != "unknown"]
    assert classes.groupby("label")["split"].value_counts().to_dict() == {
        (label, split): n
        for label in ("dandelion", "grass")
        for split, n in (("train", 14), ("val", 3), ("test", 3))
    }
    assert set(new[new["label"] == "unknown"]["split"]) <= {"train", "test"}
    again = dataset.build_manifest(more, seed=42, near_duplicate_distance=0, previous=later)
    assert dataset.compute_version(again) == dataset.compute_version(later)


def test_a_new_near_duplicate_of_a_tested_image_is_tested_too() -> None:
    first = dataset.build_manifest(_records(20), seed=7, near_duplicate_distance=0)
    tested = first[first["split"] == "test"].iloc[0]
    copy = {**_records(1)[0], "sha256": _sha("copy"), "label": tested["label"]}
    copy |= {"key": f"raw/{tested['label']}/{_sha('copy')}.jpg", "phash": tested["phash"]}
    later = dataset.build_manifest(
        [*_records(20), copy], seed=7, near_duplicate_distance=0, previous=first
    )
    row = later[later["sha256"] == _sha("copy")].iloc[0]
    assert row["split"] == "test"
    assert row["group"] == later[later["sha256"] == tested["sha256"]].iloc[0]["group"]


def test_without_a_previous_version_the_split_is_the_fresh_one() -> None:
    records = _records(30) + _negatives(8)
    plain = dataset.build_manifest(records, seed=3, near_duplicate_distance=0)
    empty = plain.iloc[0:0]
    assert plain.equals(
        dataset.build_manifest(records, seed=3, near_duplicate_distance=0, previous=empty)
    )


# --- origins: several labelled sources in one dataset -------------------------------------


def _from(origin: str, n_per_label: int) -> list[dict]:
    rows = []
    for r in _records(n_per_label):
        sha = _sha(f"{origin}{r['sha256']}")
        rows.append(r | {"sha256": sha, "key": f"raw/{r['label']}/{sha}.jpg", "origin": origin})
        rows[-1]["phash"] = _sha(sha)[:16]
    return rows


def test_splits_are_stratified_by_origin_and_label() -> None:
    """Each source's part of each class is split 70/15/15 on its own: each source's test part
    is 15% of it, however small the source is next to the others."""
    df = dataset.build_manifest(
        _from("greenr", 200) + _from("mine", 20), seed=42, near_duplicate_distance=0
    )
    counts = df.groupby(["origin", "label"])["split"].value_counts().to_dict()
    for label in ("dandelion", "grass"):
        assert [counts[("greenr", label, s)] for s in dataset.SPLITS] == [140, 30, 30]
        assert [counts[("mine", label, s)] for s in dataset.SPLITS] == [14, 3, 3]
    # the origin is content: renaming a source gives another version
    renamed = df.assign(origin=df["origin"].replace("mine", "lawn"))
    assert dataset.compute_version(renamed) != dataset.compute_version(df)


def test_one_source_splits_as_before_origins_existed() -> None:
    """With a single source the strata are the labels' members, so the split is exactly the
    label-only one (near-duplicate groups with mixed labels included)."""
    rows = _from("greenr", 60)
    for i in range(0, 30, 3):  # near-duplicate groups, some across the two labels
        rows[i + 1]["phash"] = rows[i]["phash"]
        rows[60 + i]["phash"] = rows[i]["phash"]
    df = dataset.build_manifest(rows, seed=5, near_duplicate_distance=0)
    assert (df.groupby("group").size() > 1).sum() == 10
    labels, groups = df["label"].tolist(), df["group"].tolist()
    assert df["split"].tolist() == dataset.assign_splits(labels, groups, seed=5)
    assert dataset.assign_splits(labels, groups, 5, ["greenr"] * len(df)) == df["split"].tolist()
    # records without an origin (as before) get the legacy one, and the same split
    bare = [{k: v for k, v in r.items() if k != "origin"} for r in rows]
    old = dataset.build_manifest(bare, seed=5, near_duplicate_distance=0)
    assert set(old["origin"]) == {dataset.LEGACY_ORIGIN}
    assert old["split"].tolist() == df["split"].tolist()


def test_a_manifest_without_origins_still_reads(tmp_path: Path) -> None:
    """A version written before origins were recorded (schema 1) reads with the origin
    ``default``; a later version built on it keeps its images' splits."""
    store = LocalStore(tmp_path)
    old = dataset.build_manifest(_records(20), seed=42, near_duplicate_distance=0)
    legacy = old.drop(columns=["origin"])
    store.put_bytes(dataset.manifest_key("0123456789abcdef"), dataset.manifest_to_parquet(legacy))
    store.put_json(dataset.LATEST_KEY, {"version": "0123456789abcdef"})
    loaded = dataset.load_manifest(store)
    assert tuple(loaded.columns) == dataset.MANIFEST_COLUMNS
    assert set(loaded["origin"]) == {"default"}
    assert loaded["split"].tolist() == old["split"].tolist()
    later = dataset.build_manifest(
        _records(20) + _from("mine", 20), seed=42, near_duplicate_distance=0, previous=loaded
    )
    kept = later[later["origin"] == "default"]
    assert dict(zip(kept["sha256"], kept["split"], strict=True)) == dict(
        zip(old["sha256"], old["split"], strict=True)
    )
    assert set(later[later["origin"] == "mine"]["split"]) == set(dataset.SPLITS)
