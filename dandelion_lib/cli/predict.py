"""``dandelion predict``: classify image files with a registered model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dandelion_lib.core.config import get_settings
from dandelion_lib.core.images import InvalidImageError
from dandelion_lib.lifecycle import registry
from dandelion_lib.serving.predict import Predictor


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``dandelion predict``."""
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", help="model URI (default: models:/<name>@champion)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def cli(args: argparse.Namespace) -> int:
    settings = get_settings()
    registry.configure_mlflow(settings)
    uri = args.model or registry.model_uri(
        settings.tracking.model_name, settings.serving.model_alias
    )
    predictor = Predictor.load_for_users(uri, settings)
    failed = 0
    for name in args.images:
        path = Path(name)
        try:
            x, _ = predictor.decode(path.read_bytes())
        except (InvalidImageError, OSError) as exc:
            failed += 1
            reason = getattr(exc, "reason", "unreadable")
            print(f"{path}: invalid image ({reason}): {exc}")
            continue
        p = predictor.predict_arrays(x[None])[0]
        answer = predictor.decide(p)
        if args.json:
            out: dict[str, Any] = {"file": str(path), "label": answer.label}
            out |= {"reason": answer.reason}
            out |= {"confidence": p.confidence, "probabilities": p.probabilities}
            print(json.dumps(out | {"ood_score": p.ood_score, "model_version": predictor.version}))
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            ood = "" if p.ood_score is None else f"; out-of-domain score {p.ood_score:.2f}"
            print(f"{path}: {answer.label} (confidence {p.confidence:.3f}; {probs}{ood})")
    return 1 if failed else 0
