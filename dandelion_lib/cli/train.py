"""``dandelion train``: train a model on a dataset version and register it as ``challenger``."""

from __future__ import annotations

import argparse
import dataclasses

from dandelion_lib.core.config import get_settings
from dandelion_lib.lifecycle.train import train
from dandelion_lib.training.config import TrainConfig


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion train``: one option per :class:`TrainConfig` field."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            kinds = {"max_images_per_class": int, "learning_rate": float}
            parser.add_argument(flag, type=kinds.get(f.name, str), default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def cli(args: argparse.Namespace) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    result = train(config, get_settings(), progress=True)
    m = result.metrics
    print(
        f"trained on dataset {result.dataset_version} in {result.seconds:.1f} s: "
        f"test accuracy {m['test_accuracy']:.4f}, F1 {m['test_f1']:.4f}, "
        f"ROC AUC {m.get('test_roc_auc', float('nan')):.4f}, ECE {m['test_ece']:.4f}"
    )
    where = (
        f"registered as {result.model_uri} (alias challenger)"
        if result.model_version
        else result.model_uri
    )
    print(f"run {result.run_id}; {where}")
    return 0
