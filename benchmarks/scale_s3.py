"""The scale benchmark's bucket source: the generated photos in a bucket on moto's S3 server.

:func:`photo_bucket` runs moto's S3 server in a process of its own (loopback, dummy
credentials) and uploads every generated photo to ``s3://scale-photos/photos/<label>/<file>``
(set-up, not part of the stage's figures); :func:`count_s3_requests` counts the S3 API calls
(``ListObjectsV2`` pages, ``GetObject``, ...) that a stage's process makes, by operation.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.process_support import s3_server

BUCKET = "scale-photos"
PREFIX = "photos"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""For the loopback server only: a stage that reads the bucket runs with these, never with
credentials of the environment."""


def use_dummy_credentials() -> None:
    """This process talks to the loopback server only: dummy credentials, no session token
    or profile of the environment."""
    os.environ.update(DUMMY_CREDENTIALS)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)


@contextmanager
def photo_bucket(photos: Path) -> Iterator[dict[str, Any]]:
    """moto's S3 server with every photo of ``photos/<label>/`` uploaded under
    ``s3://BUCKET/PREFIX/<label>/``, until the block ends; yields the source URL
    (``source``), the endpoint (``endpoint``), and how many objects were uploaded in how many
    seconds (``objects``, ``upload_seconds``)."""
    import boto3

    with s3_server() as endpoint:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        start = time.perf_counter()
        files = sorted(p for p in photos.glob("*/*") if p.is_file())
        for path in files:
            key = f"{PREFIX}/{path.parent.name}/{path.name}"
            s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        yield {
            "source": f"s3://{BUCKET}/{PREFIX}",
            "endpoint": endpoint,
            "objects": len(files),
            "upload_seconds": time.perf_counter() - start,
        }


def count_s3_requests(counter: Counter[str]) -> None:
    """Count every S3 API call of the S3 clients this process creates from now on (boto3's
    default session: every :class:`~dandelion_lib.core.storage.S3Store`), by operation name,
    in ``counter``."""
    import boto3

    def counted(model: Any, **_: Any) -> None:
        counter[str(model.name)] += 1

    boto3.setup_default_session()
    assert boto3.DEFAULT_SESSION is not None
    boto3.DEFAULT_SESSION.events.register("before-call.s3", counted)
