"""The object store's recorded checksums kept across a backup and a restore.

The library records each object's sha256 as S3 user metadata (``sha256``) when it writes it,
and verifies reads against it. ``aws s3 sync`` into a folder keeps only the bytes, so a bucket
restored from that folder has no recorded checksum left. Used by
``scripts/backup-object-store.sh`` and ``scripts/restore-object-store.sh``:

* ``record BUCKET DIR``: after the sync, read the recorded sha256 of every object copied (one
  HEAD each, in parallel) into ``DIR/BUCKET.sha256`` (``sha256sum`` format:
  ``<digest>  <key>``), and check each backed-up file against it. A file that differs
  (corrupted, or rewritten in the bucket during the backup) fails the backup; objects written
  after the sync are left to the next backup.
* ``verify BUCKET DIR``: before a restore writes anything, every listed file must still match;
  a damaged backup is refused whole.
* ``reattach BUCKET DIR``: after the sync back, give each listed object its recorded sha256
  again (a server-side copy onto itself with the metadata; no upload), after checking that its
  size is the backed-up file's.

Only boto3 is needed (no project install): the scripts run it with the AWS CLI's credentials
and ``S3_ENDPOINT_URL``. Exit status 1 with one line per problem.

    python deploy/object_checksums.py record|verify|reattach BUCKET DIR
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

METADATA_KEY = "sha256"
"""The user-metadata field the library's S3 store records (``dandelion_lib.core.storage``)."""
WORKERS = 16


def _client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)


def _keys(client: Any, bucket: str) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            yield str(item["Key"])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_path(folder: Path, bucket: str) -> Path:
    return folder / f"{bucket}.sha256"


def read_list(folder: Path, bucket: str) -> dict[str, str]:
    """Key -> recorded sha256, as ``record`` wrote them (empty when there is no list)."""
    path = list_path(folder, bucket)
    if not path.is_file():
        return {}
    pairs = (line.split("  ", 1) for line in path.read_text().splitlines() if line)
    return {key: digest for digest, key in pairs}


def _parallel(fn: Callable[[str], Any], keys: list[str]) -> list[Any]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(fn, keys))


def _mismatches(folder: Path, bucket: str, recorded: dict[str, str]) -> list[str]:
    def check(key: str) -> str | None:
        path = folder / bucket / key
        if not path.is_file():
            return f"{bucket}/{key}: listed, but not in the backup"
        if _file_sha256(path) != recorded[key]:
            return f"{bucket}/{key}: does not match its recorded sha256"
        return None

    return [p for p in _parallel(check, sorted(recorded)) if p]


def record(bucket: str, folder: Path) -> list[str]:
    client = _client()

    def recorded(key: str) -> tuple[str, str | None]:
        head = client.head_object(Bucket=bucket, Key=key)
        return key, head.get("Metadata", {}).get(METADATA_KEY)

    # Objects written after the sync are not in this backup: the next one takes them.
    copied = [k for k in _keys(client, bucket) if (folder / bucket / k).is_file()]
    digests = {k: d for k, d in _parallel(recorded, copied) if d}
    problems = _mismatches(folder, bucket, digests)
    if not problems:
        tmp = list_path(folder, bucket).with_suffix(".sha256.tmp")
        tmp.write_text("".join(f"{digests[k]}  {k}\n" for k in sorted(digests)))
        tmp.replace(list_path(folder, bucket))
        print(f"s3://{bucket}: {len(digests)} recorded checksums kept")
    return problems


def verify(bucket: str, folder: Path) -> list[str]:
    problems = _mismatches(folder, bucket, read_list(folder, bucket))
    if not problems:
        print(f"{folder / bucket}: every file matches its recorded checksum")
    return problems


def reattach(bucket: str, folder: Path) -> list[str]:
    client = _client()
    recorded = read_list(folder, bucket)

    def one(key: str) -> str | None:
        head = client.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] != (folder / bucket / key).stat().st_size:
            return f"{bucket}/{key}: its size in the bucket is not the backed-up file's"
        metadata = {**head.get("Metadata", {}), METADATA_KEY: recorded[key]}
        extra = {"ContentType": head["ContentType"]} if head.get("ContentType") else {}
        client.copy_object(
            Bucket=bucket,
            Key=key,
            CopySource={"Bucket": bucket, "Key": key},
            Metadata=metadata,
            MetadataDirective="REPLACE",
            **extra,
        )
        return None

    problems = [p for p in _parallel(one, sorted(recorded)) if p]
    if not problems:
        print(f"s3://{bucket}: {len(recorded)} recorded checksums restored")
    return problems


COMMANDS: dict[str, Callable[[str, Path], list[str]]] = {
    "record": record,
    "verify": verify,
    "reattach": reattach,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in COMMANDS:
        print(f"usage: object_checksums.py {'|'.join(COMMANDS)} BUCKET DIR", file=sys.stderr)
        return 2
    problems = COMMANDS[argv[0]](argv[1], Path(argv[2]))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
