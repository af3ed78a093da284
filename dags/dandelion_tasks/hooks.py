"""The hooks and callbacks of the DAGs' tasks: notebook steps and failures.

Notebook steps are ``PapermillOperator`` tasks with three hooks from this module:

* :func:`prepare_notebook` (``pre_execute``): checks the Jupyter kernel (a missing kernel fails
  the task, without retries, with a message that says how to register it), merges per-run
  parameter overrides from the DAG params, and tags every MLflow run the notebook starts
  with the Airflow run, task and code version (``MLFLOW_RUN_CONTEXT``);
* :func:`finish_notebook` (``post_execute``): stores the executed notebook under
  ``runs/<run id>/`` in the object store, links it from the MLflow run, and publishes what
  the next steps need (dataset version, model version) as XComs;
* :func:`on_task_failure` / :func:`on_task_retry`: store the failed notebook too and write a
  clear failure record, so a failed step can be opened in JupyterLab and read.

:func:`on_run_failure`, the DAGs' failure callback, writes ``runs/<run id>/FAILED.txt``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dandelion_lib.core.runs import (
    CODE_VERSION_TAG,
    DATASET_VERSION_TAG,
    NOTEBOOK_TAG,
    NOTEBOOKS,
    RUN_ID_TAG,
    TASK_ID_TAG,
    run_prefix,
)
from dandelion_lib.lifecycle import registry
from dandelion_lib.summary import where_to_look
from dandelion_tasks.common import (
    DATASET_ASSET,
    current_settings,
    fail,
    run_context_tags,
    run_store,
)

log = logging.getLogger(__name__)

NOTEBOOK_TASKS = dict(NOTEBOOKS)


# --- the executed notebook -----------------------------------------------------------------


def _output_path(task: Any) -> Path | None:
    nb = getattr(task, "output_nb", None)
    url = getattr(nb, "url", nb)
    return Path(url) if isinstance(url, str) and url else None


def _store_notebook(context: Any) -> str | None:
    """Copy the executed notebook of this task into ``runs/<run id>/``; returns its URL."""
    path = _output_path(context["task"])
    if path is None or not path.exists():
        return None
    store = run_store()
    key = run_prefix(context["run_id"]) + path.name
    store.put_file(key, path)
    return f"{store.url.rstrip('/')}/{key}"


def _mlflow_runs_of_task(context: Any) -> list[Any]:
    """MLflow runs the notebook of this task started (tagged through MLFLOW_RUN_CONTEXT)."""
    settings = current_settings()
    client = registry.configure_mlflow(settings)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    if experiment is None:
        return []
    query = (
        f"tags.`{RUN_ID_TAG}` = '{context['run_id']}' and "
        f"tags.`{TASK_ID_TAG}` = '{context['task'].task_id}'"
    )
    return list(client.search_runs([experiment.experiment_id], filter_string=query))


def _link_notebook(context: Any, url: str | None, run_ids: list[str]) -> None:
    """Log the executed notebook in the MLflow runs and tag them with its store URL."""
    path = _output_path(context["task"])
    if url is None or path is None or not run_ids:
        return
    client = registry.configure_mlflow(current_settings())
    for run_id in run_ids:
        client.log_artifact(run_id, str(path), artifact_path="notebooks")
        client.set_tag(run_id, f"{NOTEBOOK_TAG}.{context['task'].task_id}", url)


# --- notebook hooks ------------------------------------------------------------------------


def prepare_notebook(context: Any) -> None:
    """``pre_execute`` of a notebook step (see the module docstring)."""
    from dandelion_lib import pipeline  # imports jupyter_client: not at DAG parse time

    task = context["task"]
    try:
        pipeline.check_kernel(task.kernel_name or current_settings().orchestration.kernel_name)
    except pipeline.KernelMissingError as exc:
        raise fail(str(exc)) from None
    if not Path(str(task.input_nb)).is_file():
        raise fail(f"notebook {task.input_nb} not found (DANDELION_NOTEBOOKS_DIR)")
    overrides = (context["params"].get("notebook_params") or {}).get(task.task_id) or {}
    task.parameters = {**(task.parameters or {}), **overrides}
    output = _output_path(task)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(run_context_tags(context))
    log.info("notebook %s with parameters %s", task.input_nb, task.parameters)


def finish_notebook(context: Any, result: Any = None) -> None:
    """``post_execute`` of a notebook step (see the module docstring)."""
    os.environ.pop("MLFLOW_RUN_CONTEXT", None)
    task_id = context["task"].task_id
    url = _store_notebook(context)
    ti = context["ti"]
    if url:
        ti.xcom_push(key="notebook", value=url)
        log.info("executed notebook stored: %s", url)
    if task_id == "ingest":
        _after_ingest(context)
        return
    runs = [r.info.run_id for r in _mlflow_runs_of_task(context)]
    if task_id == "train":
        _after_train(context, runs, url)
    elif not runs:
        train_run = ti.xcom_pull(task_ids="train", key="mlflow_run_id")
        runs = [train_run] if train_run else []
    _link_notebook(context, url, runs)


def _after_ingest(context: Any) -> None:
    from dandelion_lib.data import dataset  # imports pandas: not at DAG parse time

    version = dataset.latest_version(run_store())
    context["ti"].xcom_push(key="dataset_version", value=version)
    context["outlet_events"][DATASET_ASSET].extra = {"dataset_version": version}
    log.info("dataset version %s", version)


def _after_train(context: Any, runs: list[str], url: str | None) -> None:
    """Find the model version the training notebook registered; record its lineage."""
    settings = current_settings()
    client = registry.configure_mlflow(settings)
    versions = [
        mv
        for run_id in runs
        for mv in client.search_model_versions(f"run_id = '{run_id}'")
        if mv.name == settings.tracking.model_name
    ]
    if not versions:
        raise fail(
            f"the training notebook registered no version of model {settings.tracking.model_name!r} "
            f"(MLflow runs of this task: {runs or 'none'})"
        )
    mv = max(versions, key=lambda v: int(v.version))
    tags = run_context_tags(context)
    for key in (CODE_VERSION_TAG, DATASET_VERSION_TAG, RUN_ID_TAG):
        if key in tags:
            client.set_model_version_tag(settings.tracking.model_name, mv.version, key, tags[key])
    if url:
        notebooks = url.rsplit("/", 1)[0] + "/"
        client.set_model_version_tag(
            settings.tracking.model_name, mv.version, NOTEBOOK_TAG, notebooks
        )
    ti = context["ti"]
    ti.xcom_push(key="model_version", value=str(mv.version))
    ti.xcom_push(key="mlflow_run_id", value=mv.run_id)
    log.info("registered %s version %s (MLflow run %s)", mv.name, mv.version, mv.run_id)


# --- failures ------------------------------------------------------------------------------


def _one_line(error: BaseException | None) -> str:
    """``Name: message`` on one line; a notebook's error is named by its original exception."""
    if error is None:
        return "unknown error"
    name = getattr(error, "ename", None)
    if name:  # papermill: the notebook raised it
        message = str(getattr(error, "evalue", "") or "")
        cell = getattr(error, "exec_count", None)
        where = f" (notebook cell [{cell}])" if cell else " (in the notebook)"
    else:
        name, message, where = type(error).__name__, str(error), ""
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    return f"{name}: {first}{where}" if first else f"{name}{where}"


def _failure_record(context: Any, *, will_retry: bool) -> dict[str, Any]:
    ti = context["ti"]
    error = context.get("exception")
    record: dict[str, Any] = {
        "dag_id": ti.dag_id,
        "run_id": context["run_id"],
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "will_retry": will_retry,
        "error": _one_line(error),
    }
    if ti.task_id in NOTEBOOK_TASKS:
        os.environ.pop("MLFLOW_RUN_CONTEXT", None)
        try:
            record["notebook"] = _store_notebook(context)
            runs = [r.info.run_id for r in _mlflow_runs_of_task(context)]
            _link_notebook(context, record["notebook"], runs)
            record["mlflow_runs"] = runs
        except Exception as exc:  # the record matters more than the copy
            record["notebook_error"] = str(exc)
    return record


def _write_failure(record: dict[str, Any]) -> None:
    prefix = run_prefix(record["run_id"])
    run_store().put_json(f"{prefix}failures/{record['task_id']}.json", record)
    lines = [
        f"dandelion: step {record['task_id']!r} failed (try {record['try_number']})"
        + (", will retry" if record["will_retry"] else ""),
        f"  error:    {record['error']}",
    ]
    if record.get("notebook"):
        lines.append(f"  notebook: {record['notebook']}  (open it in JupyterLab to read the error)")
    log.error("\n".join(lines))


def on_task_failure(context: Any) -> None:
    """Task failure callback: store the executed notebook and a one-glance failure record."""
    _write_failure(_failure_record(context, will_retry=False))


def on_task_retry(context: Any) -> None:
    """Task retry callback: same record, marked as retried."""
    _write_failure(_failure_record(context, will_retry=True))


def on_run_failure(context: Any) -> None:
    """DAG failure callback: write ``runs/<run id>/FAILED.txt`` with the failed steps."""
    dag_run = context["dag_run"]
    run_id = dag_run.run_id
    store = run_store()
    prefix = run_prefix(run_id)
    failures = [store.get_json(k) for k in store.list(f"{prefix}failures/") if k.endswith(".json")]
    failures = [f for f in failures if not f.get("will_retry")]
    lines = [f"dandelion: run {run_id} of {dag_run.dag_id} FAILED ({context.get('reason', '')})"]
    for f in failures:
        lines.append(f"  {f['task_id']}: {f['error']}")
        if f.get("notebook"):
            lines.append(f"    executed notebook: {f['notebook']}")
    look = where_to_look(current_settings(), run_id)
    lines += [f"  {k}: {v}" for k, v in look.items()]
    text = "\n".join(lines)
    store.put_bytes(f"{prefix}FAILED.txt", (text + "\n").encode())
    log.error(text)
