"""The DAGs' extraction plan fits Airflow at any size: a million images are planned (not run)
as at most ``feature_max_tasks`` mapped ``extract_features`` tasks of consecutive shards."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dandelion_lib.core.features import STAT_COLUMNS
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import dataset
from dandelion_lib.data.featurestore import shard_groups

AIRFLOW_MAX_MAP_LENGTH = 1024  # Airflow's [core] max_map_length default, never raised here


def _manifest(n: int) -> pd.DataFrame:
    """``n`` images (no bytes behind them: the plan reads the manifest only)."""
    rng = np.random.default_rng(0)
    shas = [f"{i * 2654435761 % 2**64:064x}" for i in range(n)]
    labels = np.where(np.arange(n) % 2 == 0, "dandelion", "grass")
    split = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.7, 0.15, 0.15])
    frame = pd.DataFrame(
        {
            "sha256": shas,
            "label": labels,
            "key": "raw/unused.jpg",
            "source": "synthetic",
            "origin": "synthetic",
            "width": 640,
            "height": 480,
            "format": "JPEG",
            "bytes": 50_000,
            "ingested_at": pd.Timestamp("2026-01-01", tz="UTC"),
            "phash": "0" * 16,
            "group": [s[:16] for s in shas],
            "split": split,
        }
    )
    for column in STAT_COLUMNS:
        frame[column] = 0.5
    return frame


@pytest.mark.parametrize(("shards", "tasks"), [(1, 1), (4, 4), (256, 256), (257, 256), (3907, 256)])
def test_shard_groups_cover_every_shard_once_in_bounded_runs(shards: int, tasks: int) -> None:
    groups = shard_groups(shards, 256)
    assert len(groups) == tasks and groups[0][0] == 0 and groups[-1][1] == shards
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    lengths = {stop - first for first, stop in groups}
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_a_million_images_are_planned_within_the_map_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dandelion_tasks import model_steps

    n = 1_000_000
    store = LocalStore(tmp_path / "store")
    version = "0123456789abcdef"  # written as ingestion would, without hashing a million rows
    buffer = io.BytesIO()
    _manifest(n).to_parquet(buffer, engine="pyarrow", index=False)
    store.put_bytes(dataset.manifest_key(version), buffer.getvalue())
    store.put_json(dataset.LATEST_KEY, {"version": version})
    monkeypatch.setenv("DANDELION_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("DANDELION_STORE_URL", store.url)
    monkeypatch.setenv("DANDELION_FEATURE_MAX_TASKS", "256")  # the default, named here
    monkeypatch.delenv("DANDELION_FEATURE_SHARD_SIZE", raising=False)

    # the DAG's plan_features step, not run; the stand-in backbone keys the feature store
    params = {"notebook_params": {"train": {"backbone": "stand_in"}}}
    tasks = model_steps.plan_features(version, params=params, run_id="manual__2026-01-01")

    assert len(tasks) == 256 < AIRFLOW_MAX_MAP_LENGTH
    ranges = [tuple(t["shards"]) for t in tasks]
    assert ranges == shard_groups(-(-n // 256), 256)  # 3,907 shards of 256, 15 or 16 a task
    assert ranges[-1][1] == 3907 and {t["dataset_version"] for t in tasks} == {version}
    assert {b - a for a, b in ranges} == {15, 16}
    # each task's rows are one part of the plan; all read one compacted feature index
    first = pd.read_parquet(io.BytesIO(store.get_bytes(tasks[0]["part"])))
    last = pd.read_parquet(io.BytesIO(store.get_bytes(tasks[-1]["part"])))
    assert len(first) == 16 * 256 and len(last) == n - ranges[-1][0] * 256
    assert first["sha256"].is_monotonic_increasing and first["sha256"].iloc[-1] < last["sha256"][0]
    assert len({t["index"] for t in tasks}) == 1 and store.exists(tasks[0]["index"])
