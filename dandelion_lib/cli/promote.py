"""``dandelion promote``: move the ``champion`` alias to the challenger if it passes the gate."""

from __future__ import annotations

import argparse

from dandelion_lib.core.config import get_settings
from dandelion_lib.lifecycle.promotion import promote
from dandelion_lib.lifecycle.registry import CHALLENGER


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion promote``."""
    parser.add_argument("--alias", default=CHALLENGER, help="alias of the candidate version")
    parser.add_argument(
        "--dataset-version", help="test split to score on (default: the candidate's dataset)"
    )
    parser.add_argument("--floor", type=float, help="minimum accuracy (DANDELION_PROMOTION_FLOOR)")
    parser.add_argument(
        "--tolerance", type=float, help="allowed drop vs champion (DANDELION_PROMOTION_TOLERANCE)"
    )


def cli(args: argparse.Namespace) -> int:
    result = promote(
        get_settings(),
        candidate_alias=args.alias,
        dataset_version=args.dataset_version,
        floor=args.floor,
        tolerance=args.tolerance,
    )
    print(result.summary())
    return 0
