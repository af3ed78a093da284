"""``dandelion ingest``: ingest images into the store as a new dataset version."""

from __future__ import annotations

import argparse
import json
import logging

from pydantic import ValidationError

from dandelion_lib.core.config import Settings, get_settings
from dandelion_lib.data.ingest import ingest
from dandelion_lib.data.rejections import IngestError


def load_settings() -> Settings:
    """The environment's settings; an invalid value is a one-line :class:`IngestError`."""
    try:
        return get_settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "?"
        raise IngestError(
            f"invalid setting {name} (DANDELION_{name.upper()}): {err['msg']}"
        ) from None


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        help="HTTP base URL, s3://bucket/prefix or local folder, or several comma-separated, "
        "each optionally named name=spec (DANDELION_SOURCE)",
    )
    parser.add_argument("--store", help="object store URL (DANDELION_STORE_URL)")
    parser.add_argument("--start", type=int, help="first index of the HTTP layout")
    parser.add_argument("--count", type=int, help="images per label of the HTTP layout")
    parser.add_argument("--max-per-class", type=int, help="take at most N images per label")
    parser.add_argument(
        "--extend", action="store_true", help="keep the images of the latest version too"
    )
    parser.add_argument(
        "--negatives",
        help="folder or s3://bucket/prefix of photos that are neither class, one sub-folder "
        "per kind (DANDELION_NEGATIVES_SOURCE)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )


def cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    updates = {
        k: v
        for k, v in {
            "source": args.source,
            "store_url": args.store,
            "source_start": args.start,
            "source_count": args.count,
            "max_per_class": args.max_per_class,
            "negatives_source": args.negatives,
        }.items()
        if v is not None
    }
    settings = load_settings().updated(**updates)
    report = ingest(settings, extend=args.extend, progress=args.progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
    return 0
