"""``dandelion evaluate``: score a model on a labelled folder or a dataset split."""

from __future__ import annotations

import argparse
import json

from dandelion_lib.core.config import get_settings
from dandelion_lib.core.storage import open_store
from dandelion_lib.lifecycle import registry
from dandelion_lib.lifecycle.evaluate import evaluate_folder, evaluate_split
from dandelion_lib.lifecycle.metrics import EvaluationError
from dandelion_lib.serving.predict import Predictor


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion evaluate``."""
    parser.add_argument(
        "--model",
        help="model URI (default: models:/<DANDELION_MODEL_NAME>@champion)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--images", help="labelled folder: DIR/<label>/<image files>")
    where.add_argument(
        "--dataset-version",
        help="score the test split of this dataset version (default: the model's own)",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--negatives",
        help="with --images: folder of photos that are neither class, DIR/<kind>/<files>",
    )
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")


def cli(args: argparse.Namespace) -> int:
    settings = get_settings()
    registry.configure_mlflow(settings)
    uri = args.model or registry.model_uri(settings.tracking.model_name, registry.CHAMPION)
    predictor = Predictor.load_for_users(uri, settings)
    skipped: list[str] = []
    if args.negatives and not args.images:
        raise EvaluationError("--negatives goes with --images (a dataset split has its own)")
    if args.images:
        report, skipped = evaluate_folder(predictor, args.images, args.negatives)
    else:
        version = args.dataset_version or predictor.dataset_version
        if not version:
            raise EvaluationError(f"{uri} records no dataset version; pass --dataset-version")
        report = evaluate_split(predictor, open_store(settings=settings), version, args.split)
    if args.json:
        print(json.dumps({"metrics": report.metrics, "slices": report.slices.to_dict("records")}))
    else:
        print(report.table())
    for line in skipped:
        print(f"skipped {line}")
    return 0
