"""Ingestion speed: the 400 reference images over loopback HTTP into the S3 backend.

Both servers run as separate processes on loopback: Python's ``http.server`` serving the
reference folder (it answers conditional requests with 304, as a real file host does) and
moto's S3 server (dummy credentials, loopback only). Figures: a cold run into an empty
prefix, a re-run over the unchanged source, and a baseline measured in the same run: a
plain sequential loop that downloads each image and PUTs it to S3, with no validation.
Targets (2 cores): cold <= 10 s, re-run <= 3 s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.process_support import free_port, running, s3_server

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
LABELS = ("dandelion", "grass")
COUNT = 200


def _baseline(source: str, endpoint: str, bucket: str) -> float:
    """Sequential download + PUT of every image, no validation, no concurrency."""
    import boto3
    import httpx

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    start = time.perf_counter()
    with httpx.Client(timeout=10) as client:
        for label in LABELS:
            for i in range(COUNT):
                resp = client.get(f"{source}/{label}/{i:08d}.jpg")
                resp.raise_for_status()
                s3.put_object(Bucket=bucket, Key=f"baseline/{label}/{i:08d}.jpg", Body=resp.content)
    return time.perf_counter() - start


def main() -> None:
    import boto3

    from dandelion_lib.core.config import Settings
    from dandelion_lib.data.ingest import ingest

    # Dummy credentials for the loopback S3 server only.
    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench")):
        os.environ.setdefault(k, v)
    http_port = free_port()
    http_args = ["http.server", str(http_port), "--bind", "127.0.0.1", "--directory", str(GREENR)]
    source = f"http://127.0.0.1:{http_port}"
    with running(["-m", *http_args], source), s3_server() as endpoint:
        bucket = "bench"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=bucket
        )
        baseline = _baseline(source, endpoint, bucket)
        settings = Settings(
            workdir=ROOT / ".dandelion" / "bench",
            source=source,
            store_url=f"s3://{bucket}/store",
            s3_endpoint_url=endpoint,
        )
        start = time.perf_counter()
        cold = ingest(settings, progress=False)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        rerun = ingest(settings, progress=False)
        rerun_s = time.perf_counter() - start

    assert cold.images == rerun.images == 400 and rerun.version == cold.version
    n = cold.images
    print(f"images: {n} ({cold.new} new on the cold run; re-run fetched {rerun.fetched})")
    print(f"baseline sequential download + PUT:  {baseline:6.2f} s  ({n / baseline:6.0f} img/s)")
    print(
        f"ingest cold (validate, hash, stats): {cold_s:6.2f} s  ({n / cold_s:6.0f} img/s)  "
        f"{baseline / cold_s:.2f}x baseline  target <= 10 s: {'met' if cold_s <= 10 else 'MISSED'}"
    )
    print(
        f"ingest re-run (conditional GETs):    {rerun_s:6.2f} s  ({n / rerun_s:6.0f} img/s)  "
        f"{baseline / rerun_s:.2f}x baseline  target <= 3 s: {'met' if rerun_s <= 3 else 'MISSED'}"
    )
    print(f"dataset version: {cold.version}")


if __name__ == "__main__":
    main()
