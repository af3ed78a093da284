"""Embedding extraction spread over the DAGs' mapped ``extract_features`` tasks.

The images a training embeds are cut into shards of ``feature_shard_size`` in sha256 order
(:func:`dandelion_lib.training.extraction.shard_rows`); the shards are grouped into at most
``feature_max_tasks`` runs of consecutive shards (:func:`~dandelion_lib.data.featurestore.shard_groups`),
one mapped task each. So the number of mapped tasks stays under Airflow's ``max_map_length``
(1,024 by default) at any dataset size: a million images are 3,907 shards of 256, in 256
tasks of 15 or 16 shards.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import open_store
from dandelion_lib.data.featurestore import shard_groups
from dandelion_lib.lifecycle.train import feature_extractor
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
    :func:`dandelion_lib.lifecycle.train.extract_feature_shard` does for one, reading the
    dataset version and building the backbone once. Returns the counts summed over the
    shards; empty when training does not cache features."""
    if not extraction.caches_features(config, settings):
        return {}
    store = store or open_store(settings=settings)
    data = load_data(config, settings, store)
    backbone = model_lib.build_backbone(config.backbone, config.weights, data.spec.image_size)
    fstore = extraction.open_feature_store(store, data.spec, backbone)
    extractor = feature_extractor(backbone, settings)
    size = settings.training.feature_shard_size
    counts: Counter[str] = Counter()
    for shard in range(first, stop):
        rows = extraction.shard_rows(data, shard, size)
        counts.update(
            extraction.embed_shard(
                extractor,
                rows,
                config,
                data.spec,
                store=store,
                fstore=fstore,
                dim=backbone.feature_dim,
            )
        )
    return dict(counts)
