"""Quality: what users get on photos from each source, over 3 seeds of the default recipe.

Data. The labelled sources ``greenr`` and ``indomain-dev`` (dandelions and lawns from other
photographers and websites) and the negatives ``ood-dev`` are ingested into a temporary
embedded store, as the README's offline main command does. Splits are per (source, class),
so each source's test part is ~15 % of it and never fitted or calibrated on.

Recipe. The default ``TrainConfig`` trains once per seed (42, 43, 44); the split stays the
same (it depends on the content only), so the seeds' answers on the held-out photos can be
compared. Each model is scored as users are answered (the served runtime, the answer policy
of the settings) on the test split.

Each model is scored as promotion scores it (FP32 and INT8 on the test split and their
agreement on the dataset version's photos); the report of the precision the gate would serve
is the one measured, and how many trainings get INT8 is reported.

Figures per seed, then mean ± spread (max - min) over the seeds, per source: **right
answers** (the answer is the true label; ``uncertain`` and ``unknown`` are not right),
argmax accuracy, in-domain refusals (answered ``unknown``), ECE; and the share of the held-out
negatives answered ``unknown``, overall and per kind. Agreement: the share of held-out
photos two seeds answer alike. Before/after the threshold rule, on the same models: the
refusals with the threshold calibrated on the validation photos alone (the rule before the
floor of :func:`dandelion_lib.training.openset.score_floor`).

Leave one source out (``nox -s bench -- quality loso``, also part of the default run): seed
42 trained without source S (S's photos never seen, neither fitted nor calibrated on), then
every photo of S is scored: the refusals a new photographer's photos would get. Without
``indomain-dev`` this is also the one-labelled-source case (the README's online command).

The table is printed and written as JSON to ``.dandelion/bench/quality.json`` (or the
path in ``DANDELION_BENCH_QUALITY_JSON``). Every later change to the training recipe shows
this table before and after (docs/model.md): ``nox -s bench -- quality seeds augment=false``
trains the recipe with ``TrainConfig`` fields changed (``name=value``) for the "after".
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared/datasets"
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", DATASETS / "greenr"))
INDOMAIN = Path(os.environ.get("DANDELION_INDOMAIN_DATASET", DATASETS / "indomain-dev"))
OOD_DEV = Path(os.environ.get("DANDELION_OOD_DATASET", DATASETS / "ood-dev"))
SEEDS = (42, 43, 44)
OUT = Path(os.environ.get("DANDELION_BENCH_QUALITY_JSON", ROOT / ".dandelion/bench/quality.json"))
SOURCE_FIGURES = ("right_answers", "accuracy", "unknown_share", "ece")
TARGETS = {
    "unknown_share": ("<=", 0.02),
    "ood_unknown_share": (">=", 0.90),
    "ood_unknown_share_hard": (">=", 0.75),
}


def _sources(*paths: Path) -> str:
    return ",".join(f"{p.name}={p}" for p in paths)


def _settings(tmp: Path, name: str) -> Any:
    from dandelion_lib.core.config import Settings

    return Settings(workdir=tmp / name)


RECIPE: dict[str, Any] = {}
"""``TrainConfig`` fields changed from the default recipe (command-line ``name=value``)."""


def _recipe(overrides: tuple[str, ...]) -> dict[str, Any]:
    """``name=value`` pairs as typed ``TrainConfig`` fields."""
    import dataclasses

    from dandelion_lib.training.config import TrainConfig

    defaults = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in overrides:
        name, _, text = pair.partition("=")
        if name not in defaults or not text:
            raise SystemExit(f"unknown recipe change {pair!r}: name=value with a TrainConfig field")
        default = defaults[name]
        if isinstance(default, bool):
            out[name] = text.lower() in ("1", "true", "yes")
        elif text.lower() == "none":
            out[name] = None
        elif isinstance(default, int | float) and not isinstance(default, bool):
            out[name] = type(default)(text)
        else:
            out[name] = float(text) if name.startswith("openset_") else text
    return out


def _train(settings: Any, sources: str, seed: int) -> tuple[Any, Any, Any]:
    """Ingest ``sources`` (+ ood-dev) into the settings' store and train; returns the store,
    the dataset version and the training result."""
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.lifecycle.train import train
    from dandelion_lib.training.config import TrainConfig

    store = open_store(settings=settings)
    report = ingest(settings, source=sources, store=store, negatives=str(OOD_DEV), progress=False)
    result = train(TrainConfig(seed=seed, **RECIPE), settings, store=store, progress=False)
    return store, report.version, result


def _served(settings: Any, uri: str) -> Any:
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import Predictor

    configure_mlflow(settings)
    return Predictor.load_for_users(uri, settings)


def _scores(settings: Any, store: Any, version: str, result: Any) -> Any:
    """The version's scores as promotion reads them (FP32 and INT8 on the test split, their
    agreement): those training saved with its run."""
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.lifecycle.scoring import Split, challenger_scores, score_version

    client = configure_mlflow(settings)
    split = Split.of(store, version, settings)
    if result.model_version is None:  # register=false: nothing saved
        return score_version(settings, result.model_uri, split)
    mv = client.get_model_version(settings.tracking.model_name, result.model_version)
    return challenger_scores(settings, client, split, mv)


def _without_floor(predictor: Any, store: Any, version: str, test: Any) -> dict[str, float]:
    """Refusals per source with the threshold calibrated on the validation photos alone."""
    from dandelion_lib.lifecycle.evaluate import evaluate_split
    from dandelion_lib.training.openset import threshold_for_retention

    detector = predictor.detector
    val = evaluate_split(predictor, store, version, "val")
    conformal = threshold_for_retention(val.predictions["ood_score"], detector.retention)
    frame = test.predictions
    out = {
        f"unknown_share@{origin}": float((part["ood_score"] > conformal).mean())
        for origin, part in frame.groupby("origin")
    }
    return out | {"threshold": conformal}


def _not_right(frame: Any) -> list[dict[str, Any]]:
    """The held-out photos whose answer is not their label (what to look at first)."""
    wrong = frame[frame["answer"] != frame["label"]]
    columns = [
        c for c in ("origin", "sha256", "label", "predicted", "answer", "confidence") if c in wrong
    ]
    return [
        {k: (float(v) if k == "confidence" else str(v)) for k, v in row.items()}
        for row in wrong[columns].to_dict("records")
    ]


def _seed_run(tmp: Path, seed: int) -> dict[str, Any]:
    settings = _settings(tmp, f"seed{seed}")
    store, version, result = _train(settings, _sources(GREENR, INDOMAIN), seed)
    predictor = _served(settings, result.model_uri)
    scores = _scores(settings, store, version, result)
    choice = scores.serving(settings.promotion)
    test = scores.report(choice.precision)
    m = test.metrics
    run = {
        "seed": seed,
        "dataset_version": version,
        "train_seconds": result.seconds,
        "threshold": predictor.detector.threshold,
        "floor": predictor.detector.floor,
        "right_answers": m["right_answers"],
        "by_source": m.get("by_source", {}),
        "ood": {k: v for k, v in m.items() if k.startswith("ood_unknown_share")},
        "before_floor": _without_floor(predictor, store, version, test),
        "answers": dict(zip(test.predictions["sha256"], test.predictions["answer"], strict=True)),
        "not_right": _not_right(test.predictions),
        "served_precision": choice.precision,
        "serving_reason": choice.reason,
        "int8_agreement": None if scores.agreement is None else scores.agreement.to_dict(),
    }
    by = run["by_source"]
    print(
        f"seed {seed}: right answers {m['right_answers']:.4f}; "
        + "; ".join(
            f"{o} right {f['right_answers']:.3f} refused {f['unknown_share']:.3f}"
            for o, f in by.items()
        )
        + f"; OOD refused {m.get('ood_unknown_share', float('nan')):.3f}"
        f" (hard {m.get('ood_unknown_share_hard', float('nan')):.3f}); "
        f"threshold {run['threshold']:.2f} (conformal {run['before_floor']['threshold']:.2f}); "
        f"training {result.seconds:.0f} s; served {choice.precision} ({choice.reason})",
        flush=True,
    )
    return run


def _loso(tmp: Path, left_out: Path, kept: list[Path]) -> dict[str, Any]:
    """Seed 42 trained without ``left_out``; every photo of it scored."""
    from dandelion_lib.lifecycle.evaluate import evaluate_folder

    # indomain-dev alone has 3.5 dandelions per lawn: above the default imbalance gate
    settings = _settings(tmp, f"loso-{left_out.name}").updated(max_class_imbalance=4.0)
    store, version, result = _train(settings, _sources(*kept), SEEDS[0])
    predictor = _served(settings, result.model_uri)
    scores = _scores(settings, store, version, result)
    serving = scores.serving(settings.promotion)
    report, _ = evaluate_folder(predictor, left_out)
    m = report.metrics
    out = {
        "left_out": left_out.name,
        "trained_on": [p.name for p in kept],
        "photos": m["n"],
        "right_answers": m["right_answers"],
        "accuracy": m["accuracy"],
        "unknown_share": m.get("in_domain_unknown_share", float("nan")),
        "threshold": predictor.detector.threshold,
        "floor": predictor.detector.floor,
        "served_precision": serving.precision,
        "serving_reason": serving.reason,
    }
    print(
        f"without {left_out.name} (trained on {', '.join(out['trained_on'])}): "
        f"{out['photos']} photos of {left_out.name}: right answers {out['right_answers']:.4f}, "
        f"accuracy {out['accuracy']:.4f}, refused {out['unknown_share']:.4f} "
        f"(threshold {out['threshold']:.2f}, floor {out['floor']}); "
        f"served {serving.precision} ({serving.reason})",
        flush=True,
    )
    return out


def _spread(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if v == v]
    if not clean:
        return float("nan"), float("nan")
    return statistics.mean(clean), max(clean) - min(clean)


def _agreement(runs: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for a, b in itertools.combinations(runs, 2):
        shared = set(a["answers"]) & set(b["answers"])
        same = sum(a["answers"][k] == b["answers"][k] for k in shared)
        out[f"{a['seed']}-{b['seed']}"] = same / len(shared) if shared else float("nan")
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    origins = sorted({o for r in runs for o in r["by_source"]})
    table: dict[str, Any] = {}
    for origin in origins:
        row = {}
        for name in SOURCE_FIGURES:
            row[name] = _spread([r["by_source"].get(origin, {}).get(name, np.nan) for r in runs])
        row["unknown_share_before_floor"] = _spread(
            [r["before_floor"].get(f"unknown_share@{origin}", np.nan) for r in runs]
        )
        table[origin] = row
    kinds = sorted({k for r in runs for k in r["ood"]})
    ood = {k: _spread([r["ood"].get(k, np.nan) for r in runs]) for k in kinds}
    int8 = {
        "served_int8": sum(r["served_precision"] == "int8" for r in runs),
        "trainings": len(runs),
        "agreement": [r["int8_agreement"] for r in runs],
    }
    return {"sources": table, "ood": ood, "agreement": _agreement(runs), "int8": int8}


def _verdict(name: str, value: float) -> str:
    if name not in TARGETS or value != value:
        return ""
    op, target = TARGETS[name]
    ok = value <= target if op == "<=" else value >= target
    return f"  target {op} {target:.2f}: {'met' if ok else 'NOT met'}"


def _print(summary: dict[str, Any]) -> None:
    print("\nper source, held-out test part (mean ± spread over seeds)")
    header = (
        f"{'source':<16}" + "".join(f"{n:>22}" for n in SOURCE_FIGURES) + f"{'refused before':>22}"
    )
    print(header)
    for origin, row in summary["sources"].items():
        cells = "".join(f"{row[n][0]:>14.4f} ± {row[n][1]:.3f}" for n in SOURCE_FIGURES)
        before = row["unknown_share_before_floor"]
        print(f"{origin:<16}{cells}{before[0]:>14.4f} ± {before[1]:.3f}")
        print(f"{'':<16}refusals{_verdict('unknown_share', row['unknown_share'][0])}")
    print("\nnegatives (ood-dev held-out half), answered 'unknown'")
    for kind, (mean, spread) in summary["ood"].items():
        print(f"  {kind:<36}{mean:>8.4f} ± {spread:.3f}{_verdict(kind, mean)}")
    print("\nagreement of answers between seeds (held-out photos)")
    for pair, share in summary["agreement"].items():
        print(f"  seeds {pair}: {share:.4f}")
    int8 = summary["int8"]
    print(f"\nINT8 served for {int8['served_int8']} of {int8['trainings']} trainings")
    for figures in int8["agreement"]:
        if figures:
            print(
                f"  INT8 = FP32 on {figures['identical']} of {figures['photos']} photos "
                f"(lower bound {figures['lower_bound']:.4f}), largest probability difference "
                f"{figures['max_probability_diff']:.4f}"
            )


def main(mode: str = "all", *changes: str) -> int:
    """``mode``: ``seeds`` (3 seeds), ``loso`` (leave one source out) or ``all``; ``changes``:
    ``name=value`` changes to the default recipe."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    RECIPE.clear()
    RECIPE.update(_recipe(changes))
    if RECIPE:
        print(f"recipe changes: {RECIPE}")
    for folder in (GREENR, INDOMAIN, OOD_DEV):
        if not folder.is_dir():
            print(f"quality benchmark skipped: {folder} not found")
            return 0
    started = time.monotonic()
    result: dict[str, Any] = {"seeds": list(SEEDS), "recipe_changes": RECIPE}
    with tempfile.TemporaryDirectory(prefix="dandelion-quality-") as tmp:
        if mode in ("seeds", "all"):
            runs = [_seed_run(Path(tmp), seed) for seed in SEEDS]
            result["summary"] = _summary(runs)
            result["runs"] = [{k: v for k, v in r.items() if k != "answers"} for r in runs]
            _print(result["summary"])
        if mode in ("loso", "all"):
            print("\nleave one source out (seed 42; every photo of the source left out)")
            result["leave_one_source_out"] = [
                _loso(Path(tmp), INDOMAIN, [GREENR]),
                _loso(Path(tmp), GREENR, [INDOMAIN]),
            ]
    trainings = [*result.get("runs", []), *result.get("leave_one_source_out", [])]
    served = sum(r["served_precision"] == "int8" for r in trainings)
    result["int8_served"] = {"int8": served, "trainings": len(trainings)}
    print(f"\nINT8 served by the gate for {served} of {len(trainings)} trainings")
    result["seconds"] = time.monotonic() - started
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwritten to {OUT} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
