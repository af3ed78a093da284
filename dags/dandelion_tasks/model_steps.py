"""The Python steps around training: the change check that may skip it (``check_changes``),
the embedding extraction planned and mapped over shards (``plan_features``,
``extract_features``) and the model gate (``promote``). Training and evaluation themselves are
notebook steps (``notebooks/``, with the hooks of :mod:`dandelion_tasks.hooks`).

The rules live in ``dandelion_lib``; everything heavy (MLflow, TensorFlow) is imported inside
the functions, so parsing a DAG file stays well under a second.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dandelion_lib.core.runs import PIPELINE_DAG
from dandelion_lib.lifecycle import registry
from dandelion_tasks.common import current_settings, fail, notebooks_dir, run_context_tags

log = logging.getLogger(__name__)


def check_changes(dataset_version: str, **context: Any) -> bool:
    """Short-circuit: False (training skipped, logged) when nothing changed since the champion."""
    from dandelion_lib.lifecycle import changes  # imports MLflow: not at DAG parse time

    params = context["params"]
    upstream = context["ti"].xcom_pull(task_ids="resolve_dataset") or {}
    triggered_by = upstream.get("triggered_by") or []
    added = bool(upstream.get("feedback_added"))  # a new version made here: never skipped
    if triggered_by and set(triggered_by) == {PIPELINE_DAG} and not added:
        decision = changes.TrainingDecision(
            False,
            f"dataset {dataset_version} came from {PIPELINE_DAG}, which trains it itself",
            dataset_version,
            changes.code_version(current_settings(), notebooks_dir(context)),
        )
    else:
        decision = changes.decide_training(
            dataset_version,
            current_settings(),
            force=bool(params.get("force_train")),
            notebooks_dir=notebooks_dir(context),
        )
    context["ti"].xcom_push(key="decision", value=decision.to_dict())
    log.info("%s: %s", "TRAIN" if decision.train else "SKIP TRAINING", decision.reason)
    return decision.train


def _train_config(dataset_version: str, context: Any) -> Any:
    """The training config the ``train`` notebook will use: its per-run parameters (the DAG
    param ``notebook_params.train``) over TrainConfig's defaults, on this dataset version."""
    from dandelion_lib.training.config import config_from_params  # not at DAG parse time

    overrides = (context["params"].get("notebook_params") or {}).get("train") or {}
    return config_from_params({**overrides, "dataset_version": dataset_version or None})


def plan_features(dataset_version: str, **context: Any) -> list[dict[str, Any]]:
    """The mapped ``extract_features`` tasks of the dataset version: shards of
    ``DANDELION_FEATURE_SHARD_SIZE`` images in at most ``DANDELION_FEATURE_MAX_TASKS`` runs of
    consecutive shards, one task each (at least one), so the map stays under Airflow's
    ``max_map_length`` at any dataset size. Each task's rows are written as one part, and the
    feature store's index is compacted, so a task reads neither the whole manifest nor every
    index file (``lifecycle.extract.write_plan``)."""
    from dandelion_lib.lifecycle import extract  # imports TensorFlow: not at DAG parse time

    config = _train_config(dataset_version, context)
    tasks = extract.write_plan(config, current_settings(), str(context.get("run_id") or "manual"))
    log.info(
        "dataset %s: %d extraction shard(s) in %d task(s)",
        dataset_version,
        tasks[-1]["shards"][1],
        len(tasks),
    )
    return [{"dataset_version": dataset_version, **t} for t in tasks]


def extract_features(
    dataset_version: str,
    shards: list[int],
    part: str | None = None,
    index: str | None = None,
    **context: Any,
) -> dict[str, int]:
    """The shards ``[first, stop)`` of :func:`plan_features`: their backbone embeddings into
    the feature store (only the missing ones), so that ``train`` reads them all from the
    cache. With a ``part`` (the plan's rows of these shards) only it and the compacted
    feature ``index`` are read."""
    from dandelion_lib.lifecycle import extract  # imports TensorFlow: not at DAG parse time

    first, stop = (int(s) for s in shards)
    config = _train_config(dataset_version, context)
    if part and index:
        counts = extract.extract_part(config, part, index, current_settings())
    else:
        counts = extract.extract_shard_range(config, first, stop, current_settings())
    log.info("dataset %s shards %d-%d: %s", dataset_version, first, stop - 1, counts)
    return counts


def promote(model_version: str, dataset_version: str, **context: Any) -> dict[str, Any]:
    """The model gate: move ``champion`` only if the challenger passes; no retry on rejection."""
    from dandelion_lib.lifecycle import promotion  # imports MLflow: not at DAG parse time

    settings = current_settings()
    client = registry.configure_mlflow(settings)
    challenger = registry.get_alias_version(
        client, settings.tracking.model_name, registry.CHALLENGER
    )
    if challenger is None or str(challenger.version) != str(model_version):
        raise fail(
            f"{settings.tracking.model_name}@{registry.CHALLENGER} is "
            f"{'missing' if challenger is None else f'version {challenger.version}'}, "
            f"not the version {model_version} trained in this run"
        )
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(run_context_tags(context))
    try:
        result = promotion.promote(settings, dataset_version=dataset_version)
    finally:
        os.environ.pop("MLFLOW_RUN_CONTEXT", None)
    outcome = {
        "promoted": bool(result.promoted),
        "reason": str(result.decision.reason),
        "champion_version": result.champion_version_after,
    }
    context["ti"].xcom_push(key="promotion", value=outcome)
    log.info("%s", result.summary())
    if not result.promoted:
        raise fail(
            f"{settings.tracking.model_name} version {model_version} not promoted: {outcome['reason']}"
        )
    return outcome
