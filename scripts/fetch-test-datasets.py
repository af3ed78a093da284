#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = ["pillow==13.0.0"]
# ///
"""The test datasets over HTTP, for machines without the shared copies (CI):

    uv run --no-project scripts/fetch-test-datasets.py DEST
    DANDELION_TEST_DATASET=DEST/greenr DANDELION_OOD_DATASET=DEST/ood-dev nox -s tests

* ``DEST/greenr``: the reference dataset as published, byte for byte, from the URL layout the
  pipeline ingests by default (``DEFAULT_SOURCE`` of dandelion_lib/core/config.py):
  ``<label>/<8-digit index>.jpg``, 200 per label.
* ``DEST/ood-dev``: photos of neither class, ``<kind>/<name>.jpg``, from the public
  repositories listed in scripts/ood-dev-sources.tsv, re-encoded as the shared copy was (RGB,
  longer side at most 500 px, JPEG quality 90).

Files already there are kept, so a re-run fetches only what is missing. Retries with backoff on
timeouts, connection errors, 429 and 5xx; exit status 1 with one line per missing file.
Standard library plus Pillow (pinned as in requirements.lock), so it runs before the project's
virtual environment exists.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

GREENR_URL = "https://raw.githubusercontent.com/btphan95/greenr-airflow/refs/heads/master/data"
GITHUB_RAW = "https://raw.githubusercontent.com"
LABELS = ("dandelion", "grass")
PER_LABEL = 200
SOURCES = Path(__file__).with_name("ood-dev-sources.tsv")
MAX_SIDE = 500
RETRYABLE = {429, 500, 502, 503, 504}
Job = tuple[str, Path, Callable[[bytes], bytes]]  # URL, file, what to do with the bytes


def download(url: str, retries: int = 4, timeout: float = 30.0) -> bytes:
    """GET ``url``; retried with exponential backoff unless the server says it is not there."""
    request = urllib.request.Request(url, headers={"User-Agent": "dandelion-test-datasets"})
    for attempt in range(retries + 1):
        try:
            # A fresh opener reads the proxy variables now; urlopen's global one keeps
            # whatever they were at the process's first request.
            with urllib.request.build_opener().open(request, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRYABLE or attempt == retries:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == retries:
                raise
        time.sleep(2.0**attempt)
    raise AssertionError("unreachable")


def reencode(data: bytes) -> bytes:
    """RGB, longer side at most MAX_SIDE px, JPEG quality 90 (how ood-dev was prepared)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=90)
    return out.getvalue()


def greenr_jobs(dest: Path, base_url: str) -> list[Job]:
    """(URL, file, transform) for each reference photo: kept byte for byte."""
    base = base_url.rstrip("/")
    return [
        (f"{base}/{label}/{i:08d}.jpg", dest / "greenr" / label / f"{i:08d}.jpg", _jpeg)
        for label in LABELS
        for i in range(PER_LABEL)
    ]


def ood_jobs(dest: Path, raw_url: str) -> list[Job]:
    """(URL, file, transform) for each photo of scripts/ood-dev-sources.tsv: re-encoded."""
    jobs: list[Job] = []
    for line in SOURCES.read_text().splitlines():
        if not line or line.startswith(("#", "file\t")):
            continue
        name, repo, path = line.split("\t")
        url = f"{raw_url.rstrip('/')}/{repo}/HEAD/{path}"
        jobs.append((url, dest / "ood-dev" / name, reencode))
    return jobs


def _jpeg(data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG file")
    return data


def fetch(job: Job) -> str | None:
    """Fetch one file unless it is there; None, or why it could not be fetched."""
    url, path, transform = job
    if path.exists():
        return None
    try:
        data = transform(download(url))
    except (OSError, ValueError) as exc:
        return f"{path}: {url}: {exc}"
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder for greenr/ and ood-dev/")
    parser.add_argument("--greenr-url", default=GREENR_URL, help="base of the greenr layout")
    parser.add_argument("--raw-url", default=GITHUB_RAW, help="base of GitHub's raw files")
    parser.add_argument("--workers", type=int, default=8)
    opts = parser.parse_args(argv)
    jobs = greenr_jobs(opts.dest, opts.greenr_url) + ood_jobs(opts.dest, opts.raw_url)
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        failures = [f for f in pool.map(fetch, jobs) if f]
    for failure in failures:
        print(f"not fetched: {failure}", file=sys.stderr)
    print(f"test datasets in {opts.dest}: {len(jobs) - len(failures)} of {len(jobs)} photos")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
