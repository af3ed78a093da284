"""Model selection: the default recipe against its alternatives, by cross-validation.

Repeated stratified 5-fold cross-validation (4 repeats, 20 fits per candidate) on the train
and validation splits of the reference dataset; the test split is never read, so the
figures the train benchmark reports on it stay an unbiased check of the choice.

Each candidate is one input size and one feature set of the EfficientNet-Lite0 backbone:
``head`` (the pooled 1280-d head, the classic choice) or ``head+last`` (the default: the
pooled head and the pooled projection of the last block, 1600-d). Everything else is the
default ``TrainConfig``: the same cached features with ``augment_copies`` augmented views of
each training image, the same head (standardisation, L2-regularised softmax) fitted by
``train.fit_cached_head`` for the configured epochs. Figures: mean held-out accuracy and log
loss per candidate, and their ratio to the 224 px ``head`` baseline measured in this run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
SIZES = (224, 352)
FEATURES = {"head": slice(0, 1280), "head+last": slice(0, None)}
FOLDS, REPEATS = 5, 4


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sklearn.model_selection import RepeatedStratifiedKFold

    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data import dataset
    from dandelion_lib.data.dataset import load_examples
    from dandelion_lib.data.ingest import ingest
    from dandelion_lib.lifecycle.extractor import feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.extraction import augmented_features, extract_features
    from dandelion_lib.training.fitting import fit_cached_head

    config = TrainConfig()
    labels = FeatureSpec().labels
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(workdir=Path(tmp) / "work")
        store = open_store(settings=settings)
        version = ingest(settings, source=str(GREENR), store=store, progress=False).version
        manifest = dataset.load_manifest(store, version).sort_values("sha256")
        rows = manifest[manifest["split"] != "test"].reset_index(drop=True)
        y = np.asarray([labels.index(v) for v in rows["label"]])
        print(
            f"dataset {version}: {len(rows)} train+val images (test split not used); "
            f"{FOLDS}-fold CV x {REPEATS} repeats; {config.augment_copies} augmented views, "
            f"L2 {config.l2}, {config.epochs} head epochs"
        )
        folds = list(
            RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=REPEATS, random_state=0).split(
                rows, y
            )
        )
        onehot = np.eye(len(labels), dtype=np.float32)[y]

        results: dict[str, tuple[float, float]] = {}
        for size in SIZES:
            start = time.perf_counter()
            backbone = model_lib.build_backbone(config.backbone, config.weights, size)
            extractor = feature_extractor(backbone, settings)
            dim = backbone.feature_dim
            pixels = load_examples(store, rows, FeatureSpec(image_size=size))
            originals = extract_features(extractor, pixels, dim)
            shas = [str(s) for s in rows["sha256"]]
            # No feature store: every view is extracted (the figure includes extraction).
            views = augmented_features(extractor, pixels, shas, dim, config, None, {})
            extracted = time.perf_counter() - start
            for name, cols in FEATURES.items():
                accs, losses = [], []
                x_orig, x_views = originals[:, cols], [v[:, cols] for v in views]
                for train_idx, held_idx in folds:
                    head = fit_cached_head(
                        config,
                        len(labels),
                        x_orig[train_idx],
                        np.concatenate([x[train_idx] for x in (x_orig, *x_views)]),
                        np.tile(y[train_idx], len(x_views) + 1),
                        (x_orig[held_idx], onehot[held_idx]),
                        epochs=config.epochs,
                        early_stop=False,  # no early stopping on the held-out fold
                    )
                    probs = np.asarray(head(x_orig[held_idx], training=False))
                    truth = y[held_idx]
                    accs.append(float(np.mean(probs.argmax(axis=1) == truth)))
                    picked = probs[np.arange(len(truth)), truth]
                    losses.append(float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0)))))
                key = f"{size} px {name}"
                results[key] = (statistics.mean(accs), statistics.mean(losses))
                spread = statistics.stdev(accs)
                print(
                    f"{key:18s} CV accuracy {results[key][0]:.4f} (fold sd {spread:.3f}), "
                    f"log loss {results[key][1]:.4f}  [features {extracted:.0f} s]",
                    flush=True,
                )

        base_acc, base_loss = results[f"{SIZES[0]} px head"]
        default = f"{config.image_size} px head+last"
        print(f"baseline ({SIZES[0]} px head) -> default ({default}):")
        for key, (acc, loss) in results.items():
            print(
                f"  {key:18s} errors {(1 - acc) / (1 - base_acc):.2f}x baseline, "
                f"log loss {loss / base_loss:.2f}x baseline"
                + ("   <- default" if key == default else "")
            )


if __name__ == "__main__":
    main()
