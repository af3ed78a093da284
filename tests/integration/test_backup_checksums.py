"""The object store's recorded checksums survive a backup and a restore
(``deploy/object_checksums.py``, called by ``scripts/backup-object-store.sh`` and
``scripts/restore-object-store.sh``), on a real S3-protocol server (moto).

The scripts' ``aws s3 sync`` is stood in for by plain boto3 copies of the bytes (what a sync to
and from a folder keeps: no metadata); the AWS CLI itself is run by the compose rehearsal's
restore step.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from dandelion_lib.core.storage import S3Store
from deploy import object_checksums

PREFIX = "store"


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


def _sync_down(client: object, bucket: str, folder: Path) -> None:
    """What ``aws s3 sync s3://bucket folder`` keeps: each object's bytes, nothing else."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # type: ignore[attr-defined]
        for item in page.get("Contents", []):
            path = folder / bucket / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]  # type: ignore[attr-defined]
            path.write_bytes(body.read())


def _sync_up(client: object, folder: Path, bucket: str) -> None:
    for path in sorted(p for p in (folder / bucket).rglob("*") if p.is_file()):
        key = path.relative_to(folder / bucket).as_posix()
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())  # type: ignore[attr-defined]


def test_recorded_checksums_come_back_after_a_restore(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_env)
    store = S3Store(s3_bucket, PREFIX, endpoint_url=s3_env)
    keys = ["datasets/v1/manifest.parquet", "raw/grass/abc.jpg", "datasets/latest"]
    for i, key in enumerate(keys):
        store.put_bytes(key, f"object {i}".encode() * (i + 1))
    # An object the library did not write (an Airflow log): no checksum to keep.
    client.put_object(Bucket=s3_bucket, Key="logs/run.log", Body=b"log line")
    backup = tmp_path / "backup"
    _sync_down(client, s3_bucket, backup)

    assert object_checksums.main(["record", s3_bucket, str(backup)]) == 0
    listed = object_checksums.read_list(backup, s3_bucket)
    assert sorted(listed) == sorted(f"{PREFIX}/{k}" for k in keys)

    # Restored into an empty bucket as the sync does: the bytes come back, the checksums not.
    client.create_bucket(Bucket="restored")
    (backup / "restored").symlink_to(backup / s3_bucket)
    (backup / "restored.sha256").write_text((backup / f"{s3_bucket}.sha256").read_text())
    _sync_up(client, backup, "restored")
    restored = S3Store("restored", PREFIX, endpoint_url=s3_env)
    assert all(restored.info(k).sha256 is None for k in keys)  # type: ignore[union-attr]

    assert object_checksums.main(["verify", "restored", str(backup)]) == 0
    assert object_checksums.main(["reattach", "restored", str(backup)]) == 0
    for key in keys:
        info = restored.info(key)
        assert info is not None and info.sha256 == store.info(key).sha256  # type: ignore[union-attr]
        assert restored.get_bytes(key) == store.get_bytes(key)  # verified read
    # the object without a recorded checksum is restored as it was, and gets none
    head = client.head_object(Bucket="restored", Key="logs/run.log")
    assert head["ContentLength"] == len(b"log line") and "sha256" not in head["Metadata"]


def test_a_damaged_backup_is_refused_before_anything_is_written(
    s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = boto3.client("s3", endpoint_url=s3_env)
    store = S3Store(s3_bucket, PREFIX, endpoint_url=s3_env)
    store.put_bytes("datasets/v1/manifest.parquet", b"rows")
    store.put_bytes("raw/dandelion/def.jpg", b"pixels")
    backup = tmp_path / "backup"
    _sync_down(client, s3_bucket, backup)
    assert object_checksums.main(["record", s3_bucket, str(backup)]) == 0

    (backup / s3_bucket / PREFIX / "raw/dandelion/def.jpg").write_bytes(b"pixelz")
    assert object_checksums.main(["verify", s3_bucket, str(backup)]) == 1
    assert "raw/dandelion/def.jpg: does not match its recorded sha256" in capsys.readouterr().err

    # The same damage found while backing up fails the backup and leaves the old list.
    before = (backup / f"{s3_bucket}.sha256").read_text()
    assert object_checksums.main(["record", s3_bucket, str(backup)]) == 1
    assert (backup / f"{s3_bucket}.sha256").read_text() == before
    assert object_checksums.main(["nope", s3_bucket, str(backup)]) == 2
