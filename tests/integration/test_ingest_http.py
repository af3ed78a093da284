"""Ingestion over loopback HTTP with injected faults, into both store backends."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import STAT_COLUMNS, hash_distance, perceptual_hash
from dandelion_lib.core.storage import ObjectStore, sha256_hex
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest
from tests.integration.conftest import FaultServer

D, G = "dandelion", "grass"


def _jpeg(img: Image.Image, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def _file(greenr: Path, label: str, i: int) -> bytes:
    return (greenr / label / f"{i:08d}.jpg").read_bytes()


@pytest.fixture
def faulty(http_source: FaultServer, greenr_dir: Path) -> FaultServer:
    """Indices 0..201 per label; 200..201 do not exist upstream (404) unless faked below."""
    original = Image.open(io.BytesIO(_file(greenr_dir, D, 0)))
    near = _jpeg(original.resize((original.width * 9 // 10, original.height * 9 // 10)))
    assert (
        hash_distance(perceptual_hash(original), perceptual_hash(Image.open(io.BytesIO(near)))) <= 8
    )
    fs = http_source
    fs.fault(f"{D}/00000200.jpg", "bytes", data=near)  # near-duplicate of dandelion/0
    fs.fault(f"{G}/00000200.jpg", "bytes", data=_file(greenr_dir, G, 5))  # exact duplicate
    fs.fault(f"{D}/00000003.jpg", "truncated")
    fs.fault(f"{D}/00000007.jpg", "html")
    fs.fault(f"{D}/00000019.jpg", "5xx", status=503)  # always fails
    fs.fault(f"{D}/00000021.jpg", "bytes", data=_png((16, 16)))
    fs.fault(f"{G}/00000199.jpg", "bytes", data=_file(greenr_dir, D, 199))  # label conflict
    fs.fault(f"{G}/00000011.jpg", "empty")
    fs.fault(f"{G}/00000013.jpg", "slow")
    fs.fault(f"{G}/00000017.jpg", "5xx", times=2)  # 500, 500, then the image
    return fs


def _settings(tmp_path: Path, url: str) -> Settings:
    return Settings(
        workdir=tmp_path / "work",
        source=url,
        source_count=202,
        http_concurrency=8,
        http_timeout_s=2.5,  # headroom for a loaded machine; the slow fault takes 8 s
        http_retries=2,
        http_backoff_s=0.05,
    )


EXPECTED_REJECTED = {
    (f"{D}/00000201.jpg", "not_found"),
    (f"{G}/00000201.jpg", "not_found"),
    (f"{D}/00000003.jpg", "truncated"),
    (f"{D}/00000007.jpg", "not_an_image"),
    (f"{D}/00000019.jpg", "http_error"),
    (f"{D}/00000021.jpg", "too_small"),
    (f"{D}/00000199.jpg", "label_conflict"),
    (f"{G}/00000199.jpg", "label_conflict"),
    (f"{G}/00000011.jpg", "empty"),
    (f"{G}/00000013.jpg", "timeout"),
}


# The S3 backend is slow (the slow fault's timeouts again, about 20 s): the local run checks the
# faults; S3 ingestion is in the default run through test_ingest_folder.py and test_ingest_crash.py.
@pytest.mark.parametrize(
    "store", ["local", pytest.param("s3", marks=pytest.mark.slow)], indirect=True
)
def test_http_ingest_with_faults_into_both_backends(
    faulty: FaultServer, store: ObjectStore, tmp_path: Path, greenr_dir: Path
) -> None:
    settings = _settings(tmp_path, faulty.url)
    report = ingest(settings, store=store, progress=False)

    # --- counts and rejection reasons --------------------------------------------------
    assert report.total == 404
    rejected = {(r.source.removeprefix(faulty.url + "/"), r.reason) for r in report.rejected}
    assert rejected == EXPECTED_REJECTED
    assert report.fetched == 400  # every 200 response except the one that timed out
    assert report.duplicates == 1
    assert report.images == report.new == 393 and report.unchanged == 0
    assert report.classes[D]["total"] == 196 and report.classes[G]["total"] == 197
    assert report.near_duplicate_groups == 1
    by_reason = {
        r.source.rsplit("/", 2)[-2] + "/" + r.source.rsplit("/", 1)[-1]: r for r in report.rejected
    }
    assert "503" in by_reason[f"{D}/00000019.jpg"].detail
    assert "text/html" in by_reason[f"{D}/00000007.jpg"].detail

    # retries: 5xx and timeouts retried (2 retries), 404 never
    assert faulty.hits[f"{G}/00000017.jpg"] == 3
    assert faulty.hits[f"{D}/00000019.jpg"] == 3
    assert faulty.hits[f"{G}/00000013.jpg"] == 3
    assert faulty.hits[f"{D}/00000201.jpg"] == 1

    # --- the stored version ------------------------------------------------------------
    assert dataset.latest_version(store) == report.version and report.created
    df = dataset.load_manifest(store)
    assert tuple(df.columns) == dataset.MANIFEST_COLUMNS
    assert len(df) == 393 and df["sha256"].is_unique
    rel = df["source"].str.removeprefix(faulty.url + "/")
    assert not set(rel) & {path for path, _ in EXPECTED_REJECTED}
    assert f"{G}/00000200.jpg" not in set(rel)  # collapsed onto grass/5
    row = df[rel == f"{G}/00000017.jpg"].iloc[0]  # recovered after two 500s
    data = _file(greenr_dir, G, 17)
    assert row["sha256"] == sha256_hex(data) and row["bytes"] == len(data)
    assert row["key"] == f"raw/{G}/{row['sha256']}.jpg" and row["label"] == G
    assert (row["width"], row["height"]) == Image.open(io.BytesIO(data)).size
    assert row["format"] == "JPEG" and len(row["phash"]) == 16
    assert store.get_bytes(row["key"]) == data
    for key, sha in zip(df["key"].head(20), df["sha256"].head(20), strict=True):
        assert sha256_hex(store.get_bytes(key)) == sha
    assert df[list(STAT_COLUMNS)].notna().all().all()

    # near-duplicates share a group, hence a split
    pair = df[rel.isin([f"{D}/00000000.jpg", f"{D}/00000200.jpg"])]
    assert len(pair) == 2 and pair["group"].nunique() == 1 and pair["split"].nunique() == 1

    # stratified 70/15/15 per label (groups are at most 2 images)
    for label, n in ((D, 196), (G, 197)):
        counts = df[df["label"] == label]["split"].value_counts()
        for split, frac in dataset.SPLIT_FRACTIONS.items():
            assert abs(counts[split] - frac * n) <= 2, (label, split, counts.to_dict())

    # --- re-run: nothing downloaded again, same version --------------------------------
    faulty.reset()
    again = ingest(settings, store=store, progress=False)
    assert again.version == report.version and not again.created
    assert again.fetched == 0 and again.new == 0 and again.unchanged == 393
    assert {(r.source.removeprefix(faulty.url + "/"), r.reason) for r in again.rejected} == (
        EXPECTED_REJECTED
    )
    full_bodies = [
        p for p, s in faulty.statuses if s == 200 and not p.endswith(f"{G}/00000013.jpg")
    ]
    assert full_bodies == []
    assert len({p for p, s in faulty.statuses if s == 304}) == 400
    assert dataset.list_versions(store) == [report.version]
