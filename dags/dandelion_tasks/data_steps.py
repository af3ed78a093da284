"""The Python steps that choose the dataset version a run trains on: the retraining DAG's
``resolve_dataset``, the feedback watch (``feedback_waiting``, ``announce_feedback``) and the
data gate (``validate_data``).

The rules live in ``dandelion_lib``; everything heavy (pandas, SQLAlchemy) is imported inside
the functions, so parsing a DAG file stays well under a second.
"""

from __future__ import annotations

import logging
from typing import Any

from dandelion_tasks.common import FEEDBACK_ASSET, current_settings, fail, run_store

log = logging.getLogger(__name__)


def resolve_dataset(**context: Any) -> dict[str, Any]:
    """Retraining: a new version when accepted feedback waits (the latest plus those photos,
    splits kept), else the dataset version of the triggering asset events, else the latest."""
    from dandelion_lib.data import dataset  # imports pandas: not at DAG parse time
    from dandelion_lib.data.ingest import add_accepted_feedback
    from dandelion_lib.data.rejections import SourceUnavailableError

    version = None
    sources: set[str] = set()
    events = context.get("triggering_asset_events") or {}
    for asset_events in events.values():
        for event in asset_events:
            version = (event.extra or {}).get("dataset_version") or version
            if getattr(event, "source_dag_id", None):
                sources.add(event.source_dag_id)
    settings = current_settings()
    added = None
    if settings.ingest.ingest_feedback:
        try:
            added = add_accepted_feedback(settings, store=run_store(), progress=False)
        except SourceUnavailableError as exc:
            raise fail(str(exc)) from None
    if added is not None:
        version = added.version
        log.info("accepted feedback added: dataset version %s (%s)", version, added.source)
    version = version or dataset.latest_version(run_store())
    context["ti"].xcom_push(key="dataset_version", value=version)
    return {
        "dataset_version": version,
        "triggered_by": sorted(sources),
        "feedback_added": added is not None,
    }


def feedback_waiting(**context: Any) -> bool:
    """Whether enough accepted feedback photos wait for a dataset version to retrain."""
    from dandelion_lib.data.feedback import FeedbackStore
    from dandelion_lib.data.review import ReviewQueue

    settings = current_settings()
    store = FeedbackStore.from_settings(settings)
    try:
        waiting = ReviewQueue(store).awaiting_dataset()
    finally:
        store.close()
    context["ti"].xcom_push(key="accepted_waiting", value=waiting.count)
    log.info(
        "%d accepted feedback photos wait for a dataset version (threshold %d)",
        waiting.count,
        settings.orchestration.retrain_feedback_threshold,
    )
    return waiting.count >= settings.orchestration.retrain_feedback_threshold


def announce_feedback(**context: Any) -> int:
    """Emit the feedback asset event (its ``extra`` holds the count) that starts retraining."""
    count = int(context["ti"].xcom_pull(task_ids="feedback_waiting", key="accepted_waiting") or 0)
    context["outlet_events"][FEEDBACK_ASSET].extra = {"accepted_waiting": count}
    return count


def validate_data(dataset_version: str, **context: Any) -> dict[str, Any]:
    """The data gate: a failure ends the run at once (no retry); I/O errors are retried."""
    from dandelion_lib.data import datagate  # imports pandas: not at DAG parse time

    try:
        report = datagate.validate_dataset(dataset_version or None, current_settings())
    except datagate.DataValidationError as exc:
        raise fail(str(exc)) from None
    context["ti"].xcom_push(key="dataset_version", value=report["dataset_version"])
    log.info("dataset %s passed validation: %s", report["dataset_version"], report)
    return report
