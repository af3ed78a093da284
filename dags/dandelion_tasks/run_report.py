"""The last step of every training run, ``report``: it runs whatever happened before (an
Airflow teardown), and writes and logs the run summary (``runs/<run id>/summary.json`` and
``runs/latest``) from the tasks' states and XComs.

What the summary says and how it is printed is ``dandelion_lib.summary``'s; this module only
gathers it from Airflow.
"""

from __future__ import annotations

import logging
from typing import Any

from dandelion_lib.core.runs import run_prefix
from dandelion_lib.summary import feature_totals, format_summary, model_summary, where_to_look
from dandelion_tasks.common import current_settings, run_store

log = logging.getLogger(__name__)

FAILED_STATES = ("failed", "upstream_failed")
"""Task states that make the run a failed one."""

COUNT_KEYS = ("images", "labels", "negatives", "splits", "origins", "rejected_at_ingest")
"""The figures of the data gate's report that the summary shows."""


def report(**context: Any) -> dict[str, Any]:
    """Final step (runs whatever happened before): write and log the run summary."""
    ti = context["ti"]
    run_id = context["run_id"]
    settings = current_settings()
    store = run_store(settings)
    prefix = run_prefix(run_id)
    summary = _run_status(ti, run_id, store, prefix)
    summary["trigger"] = context["params"].get("trigger") or ""
    summary["dataset_version"] = _dataset_version(ti)
    summary.update(_counts(ti))
    summary["training"] = ti.xcom_pull(task_ids="check_changes", key="decision")
    summary.update(_features(ti))
    summary["promotion"] = ti.xcom_pull(task_ids="promote", key="promotion")
    trained = ti.xcom_pull(task_ids="train", key="model_version")
    summary.update(model_summary(settings, trained))
    skipped = _skipped_promotion(summary["training"])
    if skipped and not summary["promotion"]:
        summary["promotion"] = skipped
    summary["notebooks"] = [k for k in store.list(prefix) if k.endswith(".ipynb")]
    summary["look"] = where_to_look(settings, run_id)
    store.put_json(f"{prefix}summary.json", summary)
    store.put_json("runs/latest", {"run_id": run_id, "trigger": summary["trigger"]})
    log.info("\n%s", format_summary(summary))
    return {"status": summary["status"]}


def _run_status(ti: Any, run_id: str, store: Any, prefix: str) -> dict[str, Any]:
    """The run, its status and task states, and the failure records of the tasks that failed
    for good (the ones written for a retry are left out)."""
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {})
    failures = [store.get_json(k) for k in store.list(f"{prefix}failures/") if k.endswith(".json")]
    failed = {t for t, s in states.items() if s in FAILED_STATES}
    return {
        "dag_id": ti.dag_id,
        "run_id": run_id,
        "status": "failed" if failed else "succeeded",
        "task_states": states,
        "failures": [f for f in failures if f["task_id"] in failed],
    }


def _dataset_version(ti: Any) -> Any:
    """The dataset version the run validated, else the one ingestion or resolution chose."""
    version = ti.xcom_pull(task_ids="validate_data", key="dataset_version") or ti.xcom_pull(
        task_ids=["ingest", "resolve_dataset"], key="dataset_version"
    )
    if isinstance(version, list):
        version = next((v for v in version if v), None)
    return version


def _counts(ti: Any) -> dict[str, Any]:
    """``{"counts": ...}`` from the data gate's report; empty when the gate did not report."""
    counts = ti.xcom_pull(task_ids="validate_data")
    if not counts:
        return {}
    return {"counts": {k: counts[k] for k in COUNT_KEYS if k in counts}}


def _features(ti: Any) -> dict[str, Any]:
    """``{"features": ...}``, the totals of the extraction tasks; empty when none ran."""
    shards = ti.xcom_pull(task_ids="extract_features")
    if not shards:
        return {}
    # one dict per mapped task (a single task's return value is not a list)
    shards = shards if isinstance(shards, list) else [shards]
    return {"features": feature_totals([s for s in shards if isinstance(s, dict)])}


def _skipped_promotion(training: dict[str, Any] | None) -> dict[str, Any] | None:
    """The promotion outcome of a run whose training was skipped (None when it was not)."""
    if not training or training["train"]:
        return None
    champion = training.get("champion_version")
    return {
        "promoted": False,
        "reason": "training skipped" + (f"; champion stays version {champion}" if champion else ""),
    }
