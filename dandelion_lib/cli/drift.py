"""``dandelion drift``: check a folder of new images for drift against a model's training
reference; exit status 1 when the batch drifted."""

from __future__ import annotations

import argparse
import json
import os

from dandelion_lib.core.config import get_settings
from dandelion_lib.lifecycle.drift import drift_report
from dandelion_lib.lifecycle.registry import configure_mlflow, model_uri


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion drift``."""
    parser.add_argument(
        "--model",
        default=None,
        help="Model URI whose training reference to compare with "
        "(default: models:/<model_name>@champion).",
    )
    parser.add_argument(
        "--images", required=True, help="Folder of new images (searched recursively)."
    )
    parser.add_argument("--threshold", type=float, default=None, help="PSI threshold per feature.")
    parser.add_argument(
        "--share-threshold",
        type=float,
        default=None,
        help="Share of drifted features at or above which the verdict is drift.",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def cli(args: argparse.Namespace) -> int:
    """Print per-feature scores and a verdict; exit status 1 when the batch drifted."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # clean stderr
    settings = get_settings()
    configure_mlflow(settings)
    uri = args.model or model_uri(settings.tracking.model_name, settings.serving.model_alias)
    report = drift_report(
        uri,
        args.images,
        settings=settings,
        threshold=args.threshold,
        share_threshold=args.share_threshold,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 1 if report.drift else 0
