"""The fixed cost of a feature extractor: what every training and every mapped
``extract_features`` task pays before its first image is embedded.

Each measurement is a fresh Python process, as an Airflow task is: it builds the real
backbone (EfficientNet-Lite0 at 352 px) and embeds two batches of 32 images through
``lifecycle.extractor.feature_extractor``. The baseline, in the same run: no feature store
(``cache=None``), so the backbone is converted to ONNX and checked against TensorFlow in every
process, as every task did before the converted graph was stored. Then an empty store (the
first task converts and stores the graph) and two processes on that store (they read it).
Printed: the first batch's time (conversion or reading included), the next batch's, the
process start (imports, backbone), their medians, the warm/baseline ratio, and the largest
difference between the features of the stored graph and of a fresh conversion.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 32
SIZE = 352


def _task(store: str | None, out: str) -> None:
    """One process: the backbone, its extractor (with the feature store at ``store``, or
    none), two batches; writes its figures and first features to ``out`` (.npz)."""
    start = time.perf_counter()
    import numpy as np

    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.core.storage import LocalStore
    from dandelion_lib.lifecycle.extractor import feature_extractor
    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.extraction import open_feature_store

    backbone = model_lib.build_backbone("efficientnet_lite0", "imagenet", SIZE)
    cache = (
        open_feature_store(LocalStore(store), FeatureSpec(image_size=SIZE), backbone)
        if store
        else None
    )
    pixels = np.random.default_rng(0).uniform(0, 255, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    extractor = feature_extractor(backbone, Settings(), cache=cache)
    ready = time.perf_counter() - start
    tick = time.perf_counter()
    features = extractor(pixels)
    first = time.perf_counter() - tick
    tick = time.perf_counter()
    extractor(pixels)
    second = time.perf_counter() - tick
    figures = {"start_s": ready, "first_s": first, "next_s": second, "cached": extractor.cached}
    np.savez(out, features=features, figures=json.dumps(figures))


def _run(store: str | None, out: Path) -> tuple[dict[str, float], object]:
    import numpy as np

    cmd = [sys.executable, "-m", "benchmarks.bench_extractor", "--task", out.as_posix()]
    subprocess.run([*cmd, *([store] if store else [])], check=True, capture_output=True)
    with np.load(out) as data:
        return json.loads(str(data["figures"])), data["features"]


def main() -> None:
    import numpy as np

    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="dandelion-bench-extractor-") as tmp:
        base = Path(tmp)
        plain = [_run(None, base / f"plain{i}.npz") for i in range(2)]
        rows += [("no store (baseline: converts)", f) for f, _ in plain]
        store = (base / "store").as_posix()
        cold = _run(store, base / "cold.npz")
        rows.append(("empty store (converts, stores)", cold[0]))
        warm = [_run(store, base / f"warm{i}.npz") for i in range(2)]
        rows += [("store holds the graph (reads it)", f) for f, _ in warm]
        diff = max(float(np.abs(f - plain[0][1]).max()) for _, f in warm)  # type: ignore[operator]
    print(f"{'process':<34} {'start s':>8} {'first batch s':>14} {'next batch s':>13}  cached")
    for name, f in rows:
        print(
            f"{name:<34} {f['start_s']:>8.1f} {f['first_s']:>14.1f} {f['next_s']:>13.2f}  "
            f"{f['cached']}"
        )
    baseline = statistics.median(f["first_s"] for _, f in rows[:2])
    warm_first = statistics.median(f["first_s"] for _, f in rows[3:])
    print(
        f"first batch, median: {baseline:.1f} s without the stored graph, {warm_first:.1f} s "
        f"with it ({warm_first / baseline:.2f}x; {baseline - warm_first:.1f} s saved per "
        f"task); features of the stored graph vs a fresh conversion: max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--task":
        _task(sys.argv[3] if len(sys.argv) > 3 else None, sys.argv[2])
    else:
        main()
