"""dandelion's DAGs: the end-to-end pipeline and the retraining DAG.

``dandelion_pipeline``: ingest -> validate_data -> check_changes -> plan_features ->
extract_features (mapped over shards) -> train -> evaluate -> promote -> report.
``dandelion_retrain`` (on each new dataset version, when enough accepted feedback waits, and
weekly): resolve_dataset (adds waiting accepted feedback as a new version) -> the same steps
from validate_data on.
``dandelion_feedback`` (every ``DANDELION_FEEDBACK_WATCH_CRON``): feedback_waiting ->
announce_feedback, which emits the feedback asset once the threshold is reached.

Notebook steps run ``notebooks/*.ipynb`` through Papermill in the ``dandelion`` kernel;
the other steps call ``dandelion_lib``. This file only wires tasks: nothing heavy is imported
here (see docs/pipeline.md).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypedDict

from airflow.providers.papermill.operators.papermill import PapermillOperator
from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param

from dandelion_lib.core.config import get_settings
from dandelion_tasks import data_steps, hooks, model_steps, run_report
from dandelion_tasks.common import DATASET_ASSET, FEEDBACK_ASSET, macros
from dandelion_tasks.retries import io_retries

SETTINGS = get_settings()
IO_RETRIES = io_retries(SETTINGS)
COMMON = {
    "store_url": "{{ dandelion.store_url() }}",
    "run_id": "{{ run_id }}",
}


class _DagArgs(TypedDict):
    """The arguments both DAGs share (checked against ``DAG``'s keyword arguments)."""

    start_date: datetime
    catchup: bool
    max_active_runs: int
    user_defined_macros: dict[str, Any]
    on_failure_callback: Callable[[Any], None]
    default_args: dict[str, Any]
    params: dict[str, Param]
    tags: list[str]


DAG_ARGS: _DagArgs = {
    "start_date": datetime(2026, 1, 1),
    "catchup": False,
    "max_active_runs": 1,
    "user_defined_macros": macros(__file__),
    "on_failure_callback": hooks.on_run_failure,
    "default_args": {
        "owner": "dandelion",
        "retries": 0,
        "on_failure_callback": hooks.on_task_failure,
        "on_retry_callback": hooks.on_task_retry,
    },
    "params": {
        "force_train": Param(False, type="boolean", description="Train even if unchanged."),
        "notebook_params": Param(
            {}, type="object", description='Per-step notebook overrides: {"train": {...}}.'
        ),
        "trigger": Param("", type="string", description="Tag of the caller (run summary)."),
    },
    "tags": ["dandelion"],
}


def notebook(task_id: str, parameters: dict[str, Any], **kwargs: Any) -> PapermillOperator:
    """A notebook step: Papermill runs notebooks/<step>.ipynb in the dandelion kernel."""
    return PapermillOperator(
        task_id=task_id,
        input_nb=f"{{{{ dandelion.notebook('{task_id}') }}}}",
        output_nb=f"{{{{ dandelion.output_notebook(run_id, '{task_id}') }}}}",
        parameters={**COMMON, **parameters},
        kernel_name=SETTINGS.orchestration.kernel_name,
        language_name="python",
        log_output=True,
        do_xcom_push=False,
        pre_execute=hooks.prepare_notebook,
        post_execute=hooks.finish_notebook,
        **{**IO_RETRIES, **kwargs},
    )


def training_steps(version_from: str) -> tuple[PythonOperator, PythonOperator]:
    """validate_data -> check_changes -> plan_features -> extract_features[shards] -> train
    -> evaluate -> promote -> report."""
    version = f"{{{{ ti.xcom_pull(task_ids='{version_from}', key='dataset_version') }}}}"
    validated = "{{ ti.xcom_pull(task_ids='validate_data', key='dataset_version') }}"
    model_version = "{{ ti.xcom_pull(task_ids='train', key='model_version') }}"
    validate = PythonOperator(
        task_id="validate_data",
        python_callable=data_steps.validate_data,
        op_kwargs={"dataset_version": version},
        **IO_RETRIES,
    )
    check = ShortCircuitOperator(
        task_id="check_changes",
        python_callable=model_steps.check_changes,
        op_kwargs={"dataset_version": validated},
        ignore_downstream_trigger_rules=False,
        **IO_RETRIES,
    )
    plan = PythonOperator(
        task_id="plan_features",
        python_callable=model_steps.plan_features,
        op_kwargs={"dataset_version": validated},
        **IO_RETRIES,
    )
    # One task per run of consecutive shards of the dataset version (at most
    # DANDELION_FEATURE_MAX_TASKS, under Airflow's max_map_length at any size): spread over
    # pods by the KubernetesExecutor, one after another on the embedded default.
    extract = PythonOperator.partial(
        task_id="extract_features", python_callable=model_steps.extract_features, **IO_RETRIES
    ).expand(op_kwargs=plan.output)
    train = notebook(
        "train", {"tracking_uri": "{{ dandelion.tracking_uri() }}", "dataset_version": validated}
    )
    # evaluate reports on the challenger; promotion is the separate gate step below
    evaluate = notebook(
        "evaluate",
        {
            "tracking_uri": "{{ dandelion.tracking_uri() }}",
            "dataset_version": validated,
            "promote": False,
        },
    )
    promote = PythonOperator(
        task_id="promote",
        python_callable=model_steps.promote,
        op_kwargs={"model_version": model_version, "dataset_version": validated},
        **IO_RETRIES,
    )
    report = PythonOperator(
        task_id="report", python_callable=run_report.report, **IO_RETRIES
    ).as_teardown()
    validate >> check >> plan >> extract >> train >> evaluate >> promote >> report
    return validate, report


with DAG(
    dag_id="dandelion_pipeline",
    description="Ingest, validate, train, evaluate, promote and report, end to end.",
    schedule=None,
    doc_md=__doc__,
    **DAG_ARGS,
):
    ingest = notebook("ingest", {"source": "{{ dandelion.source() }}"}, outlets=[DATASET_ASSET])
    first, _ = training_steps("ingest")
    ingest >> first


with DAG(
    dag_id="dandelion_retrain",
    description="Retrain on each new dataset version and weekly; skips when nothing changed.",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(SETTINGS.orchestration.retrain_cron, timezone="UTC"),
        assets=DATASET_ASSET | FEEDBACK_ASSET,
    ),
    doc_md=__doc__,
    **DAG_ARGS,
):
    resolve = PythonOperator(
        task_id="resolve_dataset", python_callable=data_steps.resolve_dataset, **IO_RETRIES
    )
    first, _ = training_steps("resolve_dataset")
    resolve >> first


with DAG(
    dag_id="dandelion_feedback",
    description="Starts retraining when enough accepted feedback waits for a dataset version.",
    schedule=CronTriggerTimetable(SETTINGS.orchestration.feedback_watch_cron, timezone="UTC"),
    doc_md=__doc__,
    **DAG_ARGS,
):
    waiting = ShortCircuitOperator(
        task_id="feedback_waiting", python_callable=data_steps.feedback_waiting, **IO_RETRIES
    )
    announce = PythonOperator(
        task_id="announce_feedback",
        python_callable=data_steps.announce_feedback,
        outlets=[FEEDBACK_ASSET],
        **IO_RETRIES,
    )
    waiting >> announce
