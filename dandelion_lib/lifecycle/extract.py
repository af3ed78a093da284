"""Embedding extraction spread over the DAGs' mapped ``extract_features`` tasks.

The images a training embeds are cut into shards of ``feature_shard_size`` in sha256 order
(:func:`dandelion_lib.training.extraction.shard_rows`); the shards are grouped into at most
``feature_max_tasks`` runs of consecutive shards (:func:`~dandelion_lib.data.featurestore.shard_groups`),
one mapped task each. So the number of mapped tasks stays under Airflow's ``max_map_length``
(1,024 by default) at any dataset size: a million images are 3,907 shards of 256, in 256
tasks of 15 or 16 shards.

The plan step (:func:`write_plan`) reads the dataset version once, writes each task's rows as
one Parquet part (``runs/<run_id>/extraction/<task>.parquet``) and compacts the feature store's
index (:meth:`~dandelion_lib.data.featurestore.FeatureStore.compact`). A task
(:func:`extract_part`) then reads its part and that one compacted index (plus the embeddings
and images of its own rows), never the whole manifest or every index file: its reads do not
grow with the number of shards.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pandas as pd

from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.core.storage import open_store
from dandelion_lib.data.featurestore import FeatureStore, shard_groups
from dandelion_lib.lifecycle.extractor import feature_extractor
from dandelion_lib.training import extraction
from dandelion_lib.training import model as model_lib
from dandelion_lib.training.config import TrainConfig
from dandelion_lib.training.inputs import load_data


def plan_extraction(
    config: TrainConfig, settings: Settings, *, store: Any = None
) -> list[tuple[int, int]]:
    """The ``[first, stop)`` shard ranges of the mapped tasks: at most
    ``settings.training.feature_max_tasks`` of them, together every shard once."""
    shards = extraction.feature_shards(config, settings, store=store)
    return shard_groups(shards, settings.training.feature_max_tasks)


def extract_shard_range(
    config: TrainConfig, first: int, stop: int, settings: Settings, *, store: Any = None
) -> dict[str, int]:
    """Shards ``first`` to ``stop - 1`` into the feature store, as
    each with :func:`~dandelion_lib.training.extraction.embed_shard`, reading the dataset
    version and building the backbone once. Returns the counts summed over the
    shards; empty when training does not cache features."""
    if not extraction.caches_features(config, settings):
        return {}
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    fstore = extraction.open_feature_store(store, data.spec, backbone)
    size = settings.training.feature_shard_size
    shards = (extraction.shard_rows(data, shard, size) for shard in range(first, stop))
    return _embed_shards(shards, backbone, config, data.spec, settings, store, fstore)


def part_key(run_id: str, task: int) -> str:
    """Where the plan of DAG run ``run_id`` keeps task ``task``'s rows."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return f"runs/{safe}/extraction/{task:05d}.parquet"


def write_plan(
    config: TrainConfig, settings: Settings, run_id: str, *, store: Any = None
) -> list[dict[str, Any]]:
    """The mapped tasks' arguments: each one's shard range ``shards``, the key of the Parquet
    part holding its rows (``part``) and the compacted feature index to read (``index``).
    Without the feature cache: one task that does nothing, as :func:`extract_shard_range`."""
    if not extraction.caches_features(config, settings):
        return [{"shards": [0, 1]}]
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)
    total = sum(len(data.splits[s]) for s in ("train", "val", "test"))
    rows = extraction.shard_rows(data, 0, max(total, 1))  # every shard's rows, in order
    size = settings.training.feature_shard_size
    groups = shard_groups(-(-total // size), settings.training.feature_max_tasks)
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    index = extraction.open_feature_store(store, data.spec, backbone).compact()
    tasks = []
    for task, (first, stop) in enumerate(groups):
        buffer = io.BytesIO()
        rows.iloc[first * size : stop * size].to_parquet(buffer, engine="pyarrow", index=False)
        key = part_key(run_id, task)
        store.put_bytes(key, buffer.getvalue())
        tasks.append({"shards": [first, stop], "part": key, "index": index})
    return tasks


def extract_part(
    config: TrainConfig,
    part: str,
    index: str,
    settings: Settings,
    *,
    store: Any = None,
) -> dict[str, int]:
    """The shards of a plan's part into the feature store,
    reading the part and the compacted feature ``index`` (pinned: no listing, no other
    task's manifests). Returns the counts summed over its shards."""
    store = store or open_store(settings=settings)
    rows = pd.read_parquet(io.BytesIO(store.get_bytes(part)), engine="pyarrow")
    spec = FeatureSpec(labels=tuple(settings.labels), image_size=config.image_size)
    backbone = model_lib.build_backbone(config.backbone, config.weights, spec.image_size)
    keyed = extraction.open_feature_store(store, spec, backbone)
    fstore = FeatureStore(store, keyed.key, inputs=keyed.inputs, index=index)
    size = settings.training.feature_shard_size
    shards = (
        rows.iloc[start : start + size].reset_index(drop=True)
        for start in range(0, max(len(rows), 1), size)
    )
    return _embed_shards(shards, backbone, config, spec, settings, store, fstore)


def _embed_shards(
    shards: Iterable[pd.DataFrame],
    backbone: model_lib.Backbone,
    config: TrainConfig,
    spec: FeatureSpec,
    settings: Settings,
    store: Any,
    fstore: FeatureStore,
) -> dict[str, int]:
    """Each shard's rows into the feature store (:func:`~dandelion_lib.training.extraction.embed_shard`)
    with one extractor; the counts summed over the shards."""
    extractor = feature_extractor(backbone, settings, cache=fstore)
    counts: Counter[str] = Counter()
    for rows in shards:
        counts.update(
            extraction.embed_shard(
                extractor, rows, config, spec, store=store, fstore=fstore, dim=backbone.feature_dim
            )
        )
    return dict(counts)
