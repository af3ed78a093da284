"""Rehearsal stand-in for minio-init: create the buckets on the S3-protocol server."""

import os
import sys
import time

import boto3

endpoint = os.environ.get("S3_ENDPOINT_URL", "http://minio:9000")
client = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"],
    aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"],
    region_name="us-east-1",
)
for attempt in range(60):
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        break
    except Exception as exc:  # the server is still starting
        if attempt == 59:
            sys.exit(f"s3-init: {endpoint} unreachable: {exc}")
        time.sleep(1)
for bucket in sys.argv[1:]:
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    print(f"bucket ready: {bucket}")
