"""Open-set answers: which out-of-domain detector, and how well it says ``unknown``.

Data. In-domain: the reference dataset ingested into a temporary store, with the library's
split (train / val / test). Out-of-domain: ``ood-dev`` split by
:func:`dandelion_lib.data.splits.split_ood` (seed 0, half of each folder) into a ``fit`` part
and an ``eval`` part. Features: the default backbone's (EfficientNet-Lite0, 1600-d) at the
default input size, extracted once per image; plus the default recipe's augmented views of
the training photos, for the two-class head that gives the in-domain answers.

Choice (nothing from the in-domain test split or the ood-dev ``eval`` part is read):
5-fold cross-validation over the in-domain train+val photos and the ``fit`` part of ood-dev.
In each fold every candidate is fitted on 4/5 of the in-domain photos (and 4/5 of the
negatives where it uses them), its threshold is calibrated (conformal) to keep 97 % of the
held-out in-domain photos of the fold, and the held-out negatives it rejects are counted.
Candidates that use negatives are also measured leave-one-folder-out (the negatives of one
ood-dev folder are never fitted on and their rejection is counted: a kind of photo never
seen). The candidate with the highest mean of the two rejections wins (ties: ROC AUC).

Report: the chosen candidate is fitted on the train split (and all ``fit`` negatives if it
uses them), its threshold calibrated on the val split for 97 % retention, and evaluated on
the in-domain test split and the ``eval`` part of ood-dev: ROC AUC, share of out-of-domain
photos answered ``unknown`` (overall, per folder, daisies+sunflowers), share of in-domain
test photos wrongly ``unknown``, accuracy on the test photos answered. Every candidate's
test figures are printed too, for comparison (not used to choose). Baseline measured in the
same run: the two-class head's top probability as the out-of-domain score.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
OOD_DEV = Path(os.environ.get("DANDELION_OOD_DATASET", ROOT.parent / "shared/datasets/ood-dev"))
RETENTION = 0.97
SPLIT_SEED = 0
FOLDS = 5
TARGETS = {
    "ood_unknown_share": (">=", 0.90),
    "ood_unknown_share_hard": (">=", 0.75),
    "in_domain_unknown_share": ("<=", 0.03),
    "answered_accuracy": (">=", 0.98),
}


@dataclass
class Features:
    """Every cached feature matrix of one run."""

    x: np.ndarray
    """In-domain features, manifest order (sorted by sha256)."""
    y: np.ndarray
    split: np.ndarray
    views: list[np.ndarray]
    """Augmented views of the train-split photos (rows of ``x[split == "train"]``)."""
    ood: np.ndarray
    ood_group: np.ndarray
    ood_part: np.ndarray
    ood_name: np.ndarray


def ood_files(root: Path = OOD_DEV) -> list[Path]:
    """The out-of-domain photos: every JPEG in the folders of ``root``, sorted."""
    return sorted(p for p in root.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def extract(settings_dir: Path) -> Features:
    """Ingest the reference dataset, extract every feature once (timed)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.features import FeatureSpec, bytes_to_model_input
    from dandelion_lib.core.storage import open_store, sha256_hex
    from dandelion_lib.data import dataset
    from dandelion_lib.data.dataset import load_examples
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.data.splits import split_ood
    from dandelion_lib.lifecycle.extractor import feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.extraction import augmented_features, extract_features

    config = TrainConfig()
    spec = FeatureSpec(image_size=config.image_size)
    settings = Settings(workdir=settings_dir / "work")
    store = open_store(settings=settings)
    version = ingest(settings, source=str(GREENR), store=store, progress=False).version
    manifest = dataset.load_manifest(store, version).sort_values("sha256").reset_index(drop=True)
    files = ood_files()
    blobs = [p.read_bytes() for p in files]
    groups = [p.parent.name for p in files]
    parts = split_ood([sha256_hex(b) for b in blobs], groups, seed=SPLIT_SEED, fit_fraction=0.5)

    start = time.perf_counter()
    backbone = model_lib.build_backbone(config.backbone, config.weights, config.image_size)
    extractor = feature_extractor(backbone, settings)
    dim = backbone.feature_dim
    pixels = load_examples(store, manifest, spec)
    x = extract_features(extractor, pixels, dim)
    ood_pixels = np.stack([bytes_to_model_input(b, spec).astype(np.uint8) for b in blobs])
    ood = extract_features(extractor, ood_pixels, dim)
    split = manifest["split"].to_numpy()
    train_shas = [str(s) for s in manifest["sha256"].to_numpy()[split == "train"]]
    # No feature store: every view is extracted, which is what this figure measures.
    views = augmented_features(
        extractor, pixels[split == "train"], train_shas, dim, config, None, {}
    )
    seconds = time.perf_counter() - start
    n = len(x) + len(ood) + sum(len(v) for v in views)
    print(
        f"dataset {version}: {len(manifest)} in-domain photos "
        f"({', '.join(f'{s} {int((split == s).sum())}' for s in dataset.SPLITS)}); "
        f"ood-dev {len(files)} photos (fit {parts.count('fit')}, eval {parts.count('eval')}); "
        f"{n} feature vectors ({dim}-d at {config.image_size} px, {len(views)} augmented views "
        f"of the train split) in {seconds:.0f} s ({1000 * seconds / n:.0f} ms/image)",
        flush=True,
    )
    labels = FeatureSpec().labels
    return Features(
        x=x,
        y=np.asarray([labels.index(v) for v in manifest["label"]]),
        split=split,
        views=views,
        ood=ood,
        ood_group=np.asarray(groups),
        ood_part=np.asarray(parts),
        ood_name=np.asarray([f"{p.parent.name}/{p.name}" for p in files]),
    )


@dataclass(frozen=True)
class Candidate:
    """One detector configuration: :class:`OpenSetDetector` parameters."""

    name: str
    params: dict[str, Any]

    @property
    def uses_negatives(self) -> bool:
        from dandelion_lib.training.openset import NEGATIVE_METHODS

        return self.params["method"] in NEGATIVE_METHODS


CANDIDATES: tuple[Candidate, ...] = (
    *(Candidate(f"knn k={k}", {"method": "knn", "k": k}) for k in (1, 3, 5, 10)),
    *(
        Candidate(f"mahalanobis shrink={a}", {"method": "mahalanobis", "shrinkage": a})
        for a in (0.1, 0.3, 0.5)
    ),
    *(Candidate(f"knn_ratio k={k}", {"method": "knn_ratio", "k": k}) for k in (1, 3, 5, 10)),
    *(
        Candidate(f"logistic l2={a:g}", {"method": "logistic", "l2": a})
        for a in (1e-3, 1e-2, 0.1, 1.0)
    ),
)


def fit_detector(candidate: Candidate, x: np.ndarray, y: np.ndarray, neg: np.ndarray) -> Any:
    from dandelion_lib.training.openset import OpenSetDetector

    det = OpenSetDetector(**candidate.params)
    return det.fit(x, y, negatives=neg if candidate.uses_negatives else None)


def cross_validate(feats: Features, candidates: tuple[Candidate, ...]) -> dict[str, dict[str, Any]]:
    """Per candidate, on the fit data only (in-domain train+val, ood-dev ``fit`` part):

    * ``reject``/``reject_hard``/``auc``: 5-fold CV; held-out negatives rejected at a
      threshold keeping 97 % (conformal) of the fold's held-out in-domain photos;
    * ``reject_unseen``: leave-one-folder-out; for each ood-dev folder, negatives of that
      folder are never fitted on and their rejection is measured (how well the detector
      rejects a kind of photo it has not seen; equal to ``reject`` for methods without
      negatives, up to the folds).
    """
    from sklearn.model_selection import StratifiedKFold

    from dandelion_lib.training.openset import roc_auc, threshold_for_retention

    in_idx = np.flatnonzero(feats.split != "test")
    neg_idx = np.flatnonzero(feats.ood_part == "fit")
    in_folds = list(
        StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(in_idx, feats.y[in_idx])
    )
    neg_folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(
        neg_idx, feats.ood_group[neg_idx]
    )
    folds = list(zip(in_folds, neg_folds, strict=True))
    neg_groups = feats.ood_group[neg_idx]
    folders = sorted(set(neg_groups.tolist()))
    out: dict[str, dict[str, Any]] = {}
    for cand in candidates:
        rejected, groups, aucs = [], [], []
        for (in_tr, in_ho), (neg_tr, neg_ho) in folds:
            tr, ho = in_idx[in_tr], in_idx[in_ho]
            det = fit_detector(cand, feats.x[tr], feats.y[tr], feats.ood[neg_idx[neg_tr]])
            in_scores = det.score(feats.x[ho])
            neg_scores = det.score(feats.ood[neg_idx[neg_ho]])
            thr = threshold_for_retention(in_scores, RETENTION)
            rejected.append(neg_scores > thr)
            groups.append(neg_groups[neg_ho])
            aucs.append(roc_auc(in_scores, neg_scores))
        rej, grp = np.concatenate(rejected), np.concatenate(groups)
        hard = np.isin(grp, ["daisy", "sunflowers"])
        unseen: list[np.ndarray] = []
        if cand.uses_negatives:
            for i, folder in enumerate(folders):
                tr, ho = in_idx[in_folds[i % FOLDS][0]], in_idx[in_folds[i % FOLDS][1]]
                det = fit_detector(
                    cand, feats.x[tr], feats.y[tr], feats.ood[neg_idx[neg_groups != folder]]
                )
                thr = threshold_for_retention(det.score(feats.x[ho]), RETENTION)
                unseen.append(det.score(feats.ood[neg_idx[neg_groups == folder]]) > thr)
        out[cand.name] = {
            "reject": float(rej.mean()),
            "reject_hard": float(rej[hard].mean()),
            "reject_unseen": float(np.concatenate(unseen).mean()) if unseen else float(rej.mean()),
            "auc": float(np.mean(aucs)),
        }
    return out


def selection_score(r: dict[str, Any]) -> tuple[float, float]:
    """Mean of the rejection of held-out negatives of seen and of unseen kinds; then AUC."""
    return ((r["reject"] + r["reject_unseen"]) / 2, r["auc"])


class _EpochCounter:
    def __init__(self) -> None:
        self.epochs = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.epochs = epoch + 1


def classifier_probs(feats: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The default two-class head (train.py's recipe: augmented views, early stopping on
    val, refit on train + val): probabilities on the test split, val split and ood-dev."""
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.fitting import fit_cached_head, one_hot

    config = TrainConfig()
    n = int(feats.y.max()) + 1
    tr, va, te = (feats.split == s for s in ("train", "val", "test"))
    train_x = [feats.x[tr], *feats.views]
    val = (feats.x[va], one_hot(feats.y[va], n))
    counter = _EpochCounter()
    fit_cached_head(
        config,
        n,
        feats.x[tr],
        np.concatenate(train_x),
        np.concatenate([feats.y[tr]] * len(train_x)),
        val,
        epochs=config.epochs,
        callback=counter,
    )
    head = fit_cached_head(
        config,
        n,
        np.concatenate([feats.x[tr], feats.x[va]]),
        np.concatenate([*train_x, feats.x[va]]),
        np.concatenate([feats.y[tr]] * len(train_x) + [feats.y[va]]),
        val,
        epochs=counter.epochs,
        early_stop=False,
    )

    def probs(x: np.ndarray) -> np.ndarray:
        return np.asarray(head(x, training=False))

    return probs(feats.x[te]), probs(feats.x[va]), probs(feats.ood)


def report(
    feats: Features,
    in_scores: np.ndarray,
    val_scores: np.ndarray,
    ood_scores: np.ndarray,
    correct: np.ndarray,
) -> dict[str, float]:
    """Figures on the test split and the ood-dev ``eval`` part, threshold from val."""
    from dandelion_lib.training.openset import ood_metrics, threshold_for_retention

    threshold = threshold_for_retention(val_scores, RETENTION)
    ev = feats.ood_part == "eval"
    m = ood_metrics(
        in_scores,
        ood_scores[ev],
        threshold,
        ood_groups=feats.ood_group[ev],
        in_correct=correct,
    )
    m["threshold"] = threshold
    return m


def _pct(v: float) -> str:
    return f"{100 * v:5.1f} %"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        feats = extract(Path(tmp))
    run(feats)


def run(feats: Features) -> None:
    """Choose by cross-validation on the fit data, then report on the held-out data."""
    start = time.perf_counter()
    results = cross_validate(feats, CANDIDATES)
    print(
        f"\ncross-validation ({FOLDS} folds; in-domain train+val, ood-dev fit part; threshold "
        f"keeps {RETENTION:.0%} of each held-out in-domain fold) in "
        f"{time.perf_counter() - start:.0f} s:"
    )
    print(
        f"  {'candidate':24s} {'OOD unknown':>11s} {'daisy+sunfl.':>12s} {'unseen kind':>11s} "
        f"{'ROC AUC':>8s}"
    )
    for name, r in results.items():
        print(
            f"  {name:24s} {_pct(r['reject']):>11s} {_pct(r['reject_hard']):>12s} "
            f"{_pct(r['reject_unseen']):>11s} {r['auc']:8.4f}"
        )
    chosen_name = max(results, key=lambda n: selection_score(results[n]))
    print(f"chosen by cross-validation: {chosen_name}")

    te, va = feats.split == "test", feats.split == "val"
    tr = feats.split == "train"
    fit_neg = feats.ood[feats.ood_part == "fit"]
    test_probs, val_probs, ood_probs = classifier_probs(feats)
    correct = test_probs.argmax(axis=1) == feats.y[te]

    rows: dict[str, dict[str, float]] = {}
    # baseline: the two-class head's own confidence (1 - top probability)
    rows["baseline: 1 - top prob"] = report(
        feats,
        1 - test_probs.max(axis=1),
        1 - val_probs.max(axis=1),
        1 - ood_probs.max(axis=1),
        correct,
    )
    for cand in CANDIDATES:
        det = fit_detector(cand, feats.x[tr], feats.y[tr], fit_neg)
        rows[cand.name] = report(
            feats, det.score(feats.x[te]), det.score(feats.x[va]), det.score(feats.ood), correct
        )

    ev = feats.ood_part == "eval"
    print(
        f"\nevaluation: in-domain test split ({int(te.sum())} photos), ood-dev eval part "
        f"({int(ev.sum())} photos); detectors fitted on the train split (+ the {len(fit_neg)} "
        f"ood-dev fit photos as negatives where used), threshold keeps {RETENTION:.0%} of "
        f"the val split ({int(va.sum())} photos). Only the chosen row was chosen; the others "
        f"are for comparison."
    )
    folders = sorted(set(feats.ood_group[ev].tolist()))
    head = f"  {'detector':24s} {'AUC':>6s} {'OOD unk':>8s} {'hard':>7s} " + " ".join(
        f"{g[:7]:>7s}" for g in folders
    )
    print(head + f" {'in unk':>7s} {'acc ans':>7s}")
    for name, m in rows.items():
        mark = "  <- chosen" if name == chosen_name else ""
        print(
            f"  {name:24s} {m['ood_roc_auc']:6.3f} {_pct(m['ood_unknown_share']):>8s} "
            f"{_pct(m['ood_unknown_share_hard']):>7s} "
            + " ".join(f"{_pct(m[f'ood_unknown_share_{g}']):>7s}" for g in folders)
            + f" {_pct(m['in_domain_unknown_share']):>7s} {_pct(m['answered_accuracy']):>7s}"
            + mark
        )
    chosen = rows[chosen_name]
    print(f"\nchosen detector {chosen_name}, threshold {chosen['threshold']:.4f}; targets:")
    for key, (op, target) in TARGETS.items():
        value = chosen[key]
        met = value >= target if op == ">=" else value <= target
        print(
            f"  {key:26s} {_pct(value)} (target {op} {target:.0%}: {'met' if met else 'NOT met'})"
        )
    base = rows["baseline: 1 - top prob"]
    print(
        f"  vs baseline (1 - top prob): ROC AUC {base['ood_roc_auc']:.3f} -> "
        f"{chosen['ood_roc_auc']:.3f}; OOD unknown {_pct(base['ood_unknown_share'])} -> "
        f"{_pct(chosen['ood_unknown_share'])}"
    )
    print(f"  accuracy on all test photos: {_pct(chosen['accuracy_all'])}")


if __name__ == "__main__":
    main()
