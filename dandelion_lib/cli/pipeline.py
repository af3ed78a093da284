"""``dandelion pipeline``: run the whole pipeline through Airflow and print its summary."""

from __future__ import annotations

import argparse

from dandelion_lib.core.config import get_settings
from dandelion_lib.core.runs import PIPELINE_DAG, RETRAIN_DAG
from dandelion_lib.pipeline import run_pipeline


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion pipeline``."""
    parser.add_argument(
        "--dag", default=PIPELINE_DAG, choices=[PIPELINE_DAG, RETRAIN_DAG], help="DAG to run."
    )
    parser.add_argument(
        "--force-train", action="store_true", help="Train even when nothing changed."
    )
    parser.add_argument(
        "--source", default=None, help="Image source (URL or folder); default DANDELION_SOURCE."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Stream Airflow's log.")


def cli(args: argparse.Namespace) -> int:
    """Run a DAG with ``airflow dags test`` on the embedded defaults and print its summary."""
    return run_pipeline(
        get_settings(),
        args.dag,
        force_train=bool(args.force_train),
        source=args.source,
        verbose=args.verbose,
    )
