"""Faithfulness of explanations: does the map point at what the answer depends on?

Model. The default recipe (``TrainConfig(seed=42)``, as served) on the real backbone, trained
on ``greenr`` with the ``ood-dev`` negatives, as ``dandelion train`` trains it; served on ONNX
Runtime (FP32 and INT8).

Photos, never trained on: greenr's test split and every photo of ``indomain-dev`` (another
source: other photographers and websites). The ``unknown`` example comes from ``ood-dev``'s
test split (negatives the detector was not fitted on).

* Deletion (:func:`dandelion_lib.serving.explain.deletion_test`): for each photo, the
  explained class's probability with the hottest 20 % of the grid's cells masked, against a
  random region of as many cells (mean of 3 draws). Target: the hot cells lower it more on
  >= 80 % of the photos, masked in black (``DELETION_FILL``: the zero of the model's input);
  the same regions masked in gray and in the photo's mean colour are reported beside it.
* Flower heads: on the dandelion photos with at least 1 % yellow or white pixels
  (:func:`~dandelion_lib.serving.explain.flower_mask`), the share of those pixels inside the
  hot 20 % of cells, against 20 % (chance).

Three overlays (a lawn, a dandelion, an ``unknown``) are written to ``docs/img/`` (the photo
beside it with the map over it); the figures to ``.dandelion/bench/explain.json`` (or
``DANDELION_BENCH_EXPLAIN_JSON``).
"""

from __future__ import annotations

import json
import os
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
OUT = Path(os.environ.get("DANDELION_BENCH_EXPLAIN_JSON", ROOT / ".dandelion/bench/explain.json"))
IMAGES = ROOT / "docs/img"
TARGET = 0.80
MIN_FLOWER_SHARE = 0.01


def _train(tmp: Path) -> tuple[Any, Any, str, str]:
    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.lifecycle.train import train
    from dandelion_lib.training.config import TrainConfig

    settings = Settings(workdir=tmp / "work")
    store = open_store(settings=settings)
    source = f"greenr={GREENR}"
    report = ingest(settings, source=source, store=store, negatives=str(OOD_DEV), progress=False)
    t0 = time.perf_counter()
    result = train(TrainConfig(seed=42), settings, store=store, progress=False)
    print(f"trained in {time.perf_counter() - t0:.0f} s: {result.model_uri}", flush=True)
    return settings, store, str(report.version), result.model_uri


def _held_out(store: Any, version: str) -> tuple[list[tuple[str, str, bytes]], list[bytes]]:
    """(origin, label, bytes) of the in-domain held-out photos; the test-split negatives."""
    from dandelion_lib.data.dataset import is_negative, load_manifest

    manifest = load_manifest(store, version)
    test = manifest[manifest["split"] == "test"]
    negative = is_negative(test)
    photos = [
        ("greenr", str(row.label), store.get_bytes(row.key)) for row in test[~negative].itertuples()
    ]
    for label in ("dandelion", "grass"):
        photos += [
            ("indomain-dev", label, p.read_bytes()) for p in sorted((INDOMAIN / label).glob("*"))
        ]
    negatives = [store.get_bytes(row.key) for row in test[negative].itertuples()]
    return photos, negatives


def _measure(predictor: Any, photos: list[tuple[str, str, bytes]]) -> dict[str, Any]:
    from dandelion_lib.serving import explain

    labels = list(predictor.labels)
    rng = np.random.default_rng(0)

    def log_probabilities(batch: Any) -> Any:  # the served features, the head in float64
        return explain.log_softmax(predictor.explainer.logits(predictor.features(batch)))

    rows = []
    for origin, label, data in photos:
        x, _ = predictor.decode(data)
        (pred,) = predictor.predict_arrays(x[None], explain=True)
        target = labels.index(pred.explanation.explains)
        fills = {}
        draws = rng.bit_generator.state  # every fill masks the same random regions
        for fill in explain.DELETION_FILLS:
            rng.bit_generator.state = draws
            fills[fill] = explain.deletion_test(
                log_probabilities, x, pred.explanation, target, rng, fill=fill
            )
        deletion = fills[explain.DELETION_FILL]
        row = {
            "origin": origin,
            "label": label,
            "answer": predictor.decide(pred).label,
            "explains": pred.explanation.explains,
            "before": deletion.before,
            "top": deletion.top,
            "random": deletion.random,
            "holds": deletion.holds,
            "holds_by_fill": {fill: d.holds for fill, d in fills.items()},
        }
        mask = explain.flower_mask(x)
        if label == "dandelion" and mask.mean() >= MIN_FLOWER_SHARE:
            shares = explain.cell_shares(mask, pred.explanation.grid.shape)
            hot = explain.top_cells(pred.explanation.grid)
            row["flower_in_hot"] = float(shares.ravel()[hot].sum() / shares.sum())
            row["chance"] = len(hot) / shares.size
        rows.append(row)
    return _summarise(rows) | {"rows": rows}


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from dandelion_lib.serving import explain

    holds = [r["holds"] for r in rows]
    by_origin = {
        origin: float(np.mean([r["holds"] for r in rows if r["origin"] == origin]))
        for origin in sorted({r["origin"] for r in rows})
    }
    flowers = [r for r in rows if "flower_in_hot" in r]
    drop_top = [r["before"] - r["top"] for r in rows]
    drop_random = [r["before"] - r["random"] for r in rows]
    p_top = [np.exp(r["before"]) - np.exp(r["top"]) for r in rows]
    p_random = [np.exp(r["before"]) - np.exp(r["random"]) for r in rows]
    by_fill = {
        fill: {
            "all": float(np.mean([r["holds_by_fill"][fill] for r in rows])),
            **{
                label: float(
                    np.mean([r["holds_by_fill"][fill] for r in rows if r["label"] == label])
                )
                for label in sorted({r["label"] for r in rows})
            },
        }
        for fill in rows[0]["holds_by_fill"]
    }
    return {
        "photos": len(rows),
        "deletion_fill": explain.DELETION_FILL,
        "deletion_holds": float(np.mean(holds)),
        "deletion_holds_by_origin": by_origin,
        "deletion_holds_by_fill": by_fill,
        "median_logp_drop_top": float(np.median(drop_top)),
        "median_logp_drop_random": float(np.median(drop_random)),
        "mean_p_drop_top": float(np.mean(p_top)),
        "mean_p_drop_random": float(np.mean(p_random)),
        "flower_photos": len(flowers),
        "flower_in_hot_median": float(np.median([r["flower_in_hot"] for r in flowers])),
        "flower_in_hot_mean": float(np.mean([r["flower_in_hot"] for r in flowers])),
        "flower_above_chance": float(np.mean([r["flower_in_hot"] > r["chance"] for r in flowers])),
        "chance": flowers[0]["chance"] if flowers else float("nan"),
        "answers": {
            a: sum(r["answer"] == a for r in rows) for a in sorted({r["answer"] for r in rows})
        },
    }


def _without_rows(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "rows"}


def _examples(
    predictor: Any, photos: list[tuple[str, str, bytes]], negatives: list[bytes]
) -> dict[str, str]:
    """The first confident lawn and dandelion (in photo order) answered as labelled, and the
    first test-split negative answered ``unknown``: each saved as photo | overlay."""
    from dandelion_lib.core.images import decode_image
    from dandelion_lib.serving import explain

    wanted = {"lawn": "grass", "dandelion": "dandelion"}
    candidates = [
        (name, data) for name, label in wanted.items() for _, lab, data in photos if lab == label
    ]
    candidates += [("unknown", data) for data in negatives]
    saved: dict[str, str] = {}
    for name, data in candidates:
        if name in saved:
            continue
        x, _ = predictor.decode(data)
        (pred,) = predictor.predict_arrays(x[None], explain=True)
        answer = predictor.decide(pred).label
        expected = wanted.get(name, "unknown")
        if answer != expected or (name != "unknown" and pred.confidence < 0.9):
            continue
        image = decode_image(data)
        image.thumbnail((480, 480))
        path = IMAGES / f"explain-{name}.png"
        _side_by_side(image, explain.overlay(image, pred.explanation.grid)).save(
            path, optimize=True
        )
        saved[name] = (
            f"docs/img/{path.name}: answered {answer}, explains {pred.explanation.explains}"
        )
    return saved


def _side_by_side(left: Any, right: Any) -> Any:
    from PIL import Image

    gap = 8
    out = Image.new("RGB", (left.width + gap + right.width, left.height), "white")
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def main() -> int:
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import AnswerPolicy, Predictor

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        settings, store, version, uri = _train(Path(tmp))
        photos, negatives = _held_out(store, version)
        configure_mlflow(settings)
        figures: dict[str, Any] = {"model": "default recipe, seed 42, greenr + ood-dev"}
        for precision in ("fp32", "int8"):
            predictor = Predictor.load(
                uri,
                settings,
                runtime="onnx",
                precision=precision,
                policy=AnswerPolicy.from_settings(settings),
            )
            t0 = time.perf_counter()
            figures[precision] = _measure(predictor, photos)
            print(
                f"{precision}: {json.dumps(_without_rows(figures[precision]))} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if precision == "fp32":
                figures["examples"] = _examples(predictor, photos, negatives)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2, sort_keys=True))
    status = 0
    for precision in ("fp32", "int8"):
        f = figures[precision]
        met = f["deletion_holds"] >= TARGET
        status = status or int(not met)
        print(
            f"{precision}: deletion ({f['deletion_fill']} fill) holds on {f['deletion_holds']:.1%} "
            f"of {f['photos']} held-out "
            f"photos (target >= {TARGET:.0%}: {'met' if met else 'NOT met'}); by source "
            + ", ".join(f"{k} {v:.1%}" for k, v in f["deletion_holds_by_origin"].items())
            + "; every fill (all / dandelion / grass photos): "
            + ", ".join(
                f"{fill} {v['all']:.1%} / {v.get('dandelion', float('nan')):.1%} / "
                f"{v.get('grass', float('nan')):.1%}"
                for fill, v in f["deletion_holds_by_fill"].items()
            )
            + f"; median log-probability drop hot {f['median_logp_drop_top']:.3f} vs random "
            f"{f['median_logp_drop_random']:.3f} (mean probability drop {f['mean_p_drop_top']:.3f} "
            f"vs {f['mean_p_drop_random']:.3f}); "
            f"flower pixels in the hot 20 %: median {f['flower_in_hot_median']:.1%} (chance "
            f"{f['chance']:.1%}), above chance on {f['flower_above_chance']:.1%} of "
            f"{f['flower_photos']} dandelion photos"
        )
    for name, text in figures.get("examples", {}).items():
        print(f"example {name}: {text}")
    print(f"figures written to {OUT}")
    return status
