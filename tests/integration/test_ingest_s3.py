"""Ingestion from a bucket (``s3://bucket/prefix``), on the loopback S3 server (moto): labelled
photos under ``<prefix>/<label>/``, negatives under ``<prefix>/<kind>/``, next to a local
folder in one list of sources; a missing bucket or an empty prefix is a one-line error."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest, make_negatives_source
from dandelion_lib.data.rejections import SourceUnavailableError
from dandelion_lib.data.s3source import S3Source
from dandelion_lib.data.sources import FetchError
from tests.integration.test_ingest_folder import _cli, _copy

D, G = "dandelion", "grass"


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def photo_bucket(s3_server: str, greenr_dir: Path, ood_dir: Path) -> str:
    """A bucket with 25 photos per label under ``photos/lawn/<label>/`` (plus a hidden object,
    a folder marker and a README beside them), and 5 negatives of two kinds under
    ``negatives/<kind>/`` (plus a list of origins at the top)."""
    bucket = f"photos-{uuid.uuid4().hex[:10]}"
    s3 = _client(s3_server)
    s3.create_bucket(Bucket=bucket)
    for label in (D, G):
        for i in range(100, 125):
            body = (greenr_dir / label / f"{i:08d}.jpg").read_bytes()
            s3.put_object(Bucket=bucket, Key=f"photos/lawn/{label}/{i:08d}.jpg", Body=body)
    first = (greenr_dir / D / "00000100.jpg").read_bytes()
    s3.put_object(Bucket=bucket, Key=f"photos/lawn/{D}/.hidden.jpg", Body=first)
    s3.put_object(Bucket=bucket, Key=f"photos/lawn/{G}/empty-folder/", Body=b"")
    s3.put_object(Bucket=bucket, Key="photos/lawn/README.txt", Body=b"not a label")
    for kind in ("objects", "daisy"):
        for p in sorted((ood_dir / kind).glob("*.jpg"))[:5]:
            s3.put_object(Bucket=bucket, Key=f"negatives/{kind}/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=bucket, Key="negatives/SOURCES.tsv", Body=b"file\trepository\n")
    return bucket


def _settings(tmp_path: Path, endpoint: str, source: str, **kw: object) -> Settings:
    return Settings(
        workdir=tmp_path / "work",
        source=source,
        s3_endpoint_url=endpoint,
        ingest_feedback=False,
        **kw,  # type: ignore[arg-type]
    )


def test_a_bucket_and_a_folder_in_one_version(
    s3_server: str, photo_bucket: str, greenr_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "greenr"
    for label in (D, G):
        _copy(greenr_dir, folder, label, range(30))
    lawn = f"s3://{photo_bucket}/photos/lawn"
    negatives = f"s3://{photo_bucket}/negatives/"
    settings = _settings(tmp_path, s3_server, f"{folder},{lawn}", negatives_source=negatives)
    store = LocalStore(tmp_path / "store")
    report = ingest(settings, store=store, progress=False)

    df = dataset.load_manifest(store, report.version)
    assert report.rejected == [] and report.fetched == report.total == 60 + 50 + 10
    assert df.groupby("origin")["label"].value_counts().to_dict() == {
        ("greenr", D): 30,
        ("greenr", G): 30,
        ("lawn", D): 25,
        ("lawn", G): 25,
        ("negatives", "unknown"): 10,
    }
    lawn_rows = df[df["origin"] == "lawn"]
    assert lawn_rows["source"].str.startswith(f"{lawn}/").all()
    assert (
        lawn_rows["source"].str.removeprefix(f"{lawn}/").str.split("/").str[0] == lawn_rows["label"]
    ).all()
    neg = df[df["origin"] == "negatives"]
    assert {dataset.negative_kind(s) for s in neg["source"]} == {"objects", "daisy"}
    for key in df["key"]:  # every image is in the store, as from a folder
        assert store.exists(key)

    # A re-run lists the bucket again and reads no object whose ETag and size are unchanged.
    again = ingest(settings, store=store, progress=False)
    assert again.version == report.version and not again.created
    assert again.fetched == 0 and again.unchanged == report.images


def test_the_listing_is_paginated(s3_server: str, photo_bucket: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, s3_server, "unused")
    url = f"s3://{photo_bucket}/photos/lawn"
    whole = S3Source(url, settings).items()
    paged = S3Source(url, settings, page_size=7).items()  # 4 pages per label
    assert paged == whole and len(whole) == 50
    assert [i.label for i in whole] == [D] * 25 + [G] * 25
    assert all(i.origin == "lawn" for i in whole)
    capped = S3Source(url, settings.updated(max_per_class=10), page_size=3).items()
    assert capped == whole[:10] + whole[25:35]


def test_an_object_over_the_byte_limit_is_refused_unread(
    s3_server: str, photo_bucket: str, tmp_path: Path
) -> None:
    big = 2_000_000
    _client(s3_server).put_object(
        Bucket=photo_bucket, Key=f"photos/lawn/{G}/huge.jpg", Body=b"\xff" * big
    )
    settings = _settings(
        tmp_path, s3_server, f"s3://{photo_bucket}/photos/lawn", max_download_bytes=big // 2
    )
    report = ingest(settings, store=LocalStore(tmp_path / "store"), progress=False)
    assert [(Path(r.source).name, r.reason) for r in report.rejected] == [("huge.jpg", "too_large")]
    assert report.images == 50
    # an object that grew past the limit after it was listed is not read beyond the limit
    source = S3Source(f"s3://{photo_bucket}/photos/lawn", settings)
    item = next(i for i in source.items() if i.source.endswith("huge.jpg"))
    source._listed[item.source] = replace(source._listed[item.source], size=10)
    with pytest.raises(FetchError, match="more than 1,000,000 bytes"):
        source.fetch(item, None)


def test_a_missing_bucket_or_prefix_is_one_line(
    s3_server: str, photo_bucket: str, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "store")
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/photos"
    with pytest.raises(
        SourceUnavailableError, match=r"source s3://no-such-\w+/photos: .*NoSuchBucket"
    ):
        ingest(_settings(tmp_path, s3_server, missing), store=store, progress=False)
    empty = f"s3://{photo_bucket}/photos/elsewhere"
    with pytest.raises(SourceUnavailableError, match=r"has no objects under dandelion/, grass/"):
        ingest(_settings(tmp_path, s3_server, empty), store=store, progress=False)
    flat = f"s3://{photo_bucket}/photos/lawn/{D}"  # files, no kinds
    no_kinds = make_negatives_source(flat, _settings(tmp_path, s3_server, "x"))
    with pytest.raises(SourceUnavailableError, match="has no objects under a kind"):
        no_kinds.items()
    assert list(store.list("datasets/")) == []

    bad = _cli(
        tmp_path,
        DANDELION_SOURCE=missing,
        DANDELION_S3_ENDPOINT_URL=s3_server,
        DANDELION_INGEST_FEEDBACK="false",
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "NoSuchBucket" in bad.stderr, bad.stderr
