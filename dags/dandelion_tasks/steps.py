"""Airflow glue of the dandelion DAGs: hooks, callbacks and the Python steps (the only module
besides the DAG files that imports Airflow; ``dandelion_lib`` never does).

The DAG files in ``dags/`` only wire tasks together; everything they call lives here (Airflow
puts the DAG folder on ``sys.path``, so the DAG file imports it as ``dandelion_tasks.steps``). The
rules themselves live in ``dandelion_lib`` (data gate, change detection, promotion, summary);
everything heavy (pandas, MLflow, papermill's results) is imported inside the functions, so
parsing a DAG file stays well under a second.

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
"""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from airflow.exceptions import AirflowFailException
from airflow.sdk import Asset
from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

from dandelion_lib.core.config import Settings, get_settings
from dandelion_lib.core.runs import (
    CODE_VERSION_TAG,
    DAG_ID_TAG,
    DATASET_VERSION_TAG,
    NOTEBOOK_TAG,
    NOTEBOOKS,
    PIPELINE_DAG,
    RUN_ID_TAG,
    TASK_ID_TAG,
    run_key,
    run_prefix,
)
from dandelion_lib.core.storage import open_store
from dandelion_lib.lifecycle import registry
from dandelion_lib.summary import feature_totals, format_summary, model_summary, where_to_look

log = logging.getLogger(__name__)

DATASET_ASSET = Asset(
    name="dandelion_dataset",
    uri="dandelion://datasets/latest",
    group="dandelion",
    extra={"store_key": "datasets/latest"},
)
"""Emitted by ingestion for each dataset version; the retraining DAG is scheduled on it."""

FEEDBACK_ASSET = Asset(
    name="dandelion_feedback",
    uri="dandelion://feedback/accepted",
    group="dandelion",
)
"""Emitted when enough reviewed, accepted feedback waits for a dataset version
(``DANDELION_RETRAIN_FEEDBACK_THRESHOLD``); the retraining DAG is scheduled on it too."""

NOTEBOOK_TASKS = dict(NOTEBOOKS)


def _settings() -> Settings:
    return get_settings()


class Macros:
    """``{{ dandelion.* }}`` in the DAGs' templates: values rendered when a task runs.

    ``default_notebooks`` is the ``notebooks/`` folder beside the DAG folder (the repository
    layout, also in the pipeline image); ``DANDELION_NOTEBOOKS_DIR``
    overrides it.
    """

    def __init__(self, default_notebooks: Path):
        self.default_notebooks = default_notebooks

    def notebooks_dir(self) -> Path:
        return (
            (_settings().orchestration.notebooks_dir or self.default_notebooks)
            .expanduser()
            .resolve()
        )

    @staticmethod
    def store_url() -> str:
        return _settings().resolved_store_url

    @staticmethod
    def tracking_uri() -> str:
        return _settings().resolved_tracking_uri

    @staticmethod
    def source() -> str:
        return _settings().ingest.source

    @staticmethod
    def model_name() -> str:
        return _settings().tracking.model_name

    def notebook(self, task_id: str) -> str:
        """Absolute path of the notebook a step runs."""
        return str(self.notebooks_dir() / NOTEBOOKS[task_id])

    @staticmethod
    def output_notebook(run_id: str, task_id: str) -> str:
        """Local path papermill writes the executed notebook to."""
        runs = _settings().workdir_path / "runs"
        return str(runs / run_key(run_id) / NOTEBOOKS[task_id])


def macros(dag_file: str) -> dict[str, Any]:
    """``user_defined_macros`` of a DAG defined in ``dag_file`` (in ``<repo>/dags/``)."""
    return {"dandelion": Macros(Path(dag_file).resolve().parents[1] / "notebooks")}


def _notebooks_dir(context: Any) -> Path:
    dag = context.get("dag")
    found = (getattr(dag, "user_defined_macros", None) or {}).get("dandelion")
    if isinstance(found, Macros):
        return found.notebooks_dir()
    return _settings().resolved_notebooks_dir


class GateRetryPolicy(RetryPolicy):
    """Retry transient failures with the task's backoff; never a failed quality gate, never a
    deterministic error inside a notebook.

    A notebook's exception surfaces as Papermill's execution error, whose ``ename`` names the
    original exception: a failed gate (:attr:`GATE_ERRORS`) fails at once, and so does any
    error not in :attr:`TRANSIENT_ERRORS` (a bug or bad data does not heal by re-running the
    notebook). Exceptions of the Python steps follow the task's retries, except the gates'.
    """

    GATE_ERRORS = frozenset({"DatasetQualityError", "DataValidationError", "KernelMissingError"})
    TRANSIENT_ERRORS = frozenset(
        {
            # builtins
            "OSError",
            "ConnectionError",
            "ConnectionResetError",
            "ConnectionRefusedError",
            "ConnectionAbortedError",
            "BrokenPipeError",
            "TimeoutError",
            # dandelion
            "StoreUnavailableError",
            "SourceUnavailableError",
            # httpx, urllib3, requests, botocore, SQLAlchemy
            "TransportError",
            "NetworkError",
            "ConnectError",
            "ReadError",
            "WriteError",
            "RemoteProtocolError",
            "TimeoutException",
            "ConnectTimeout",
            "ReadTimeout",
            "WriteTimeout",
            "PoolTimeout",
            "ProtocolError",
            "MaxRetryError",
            "NewConnectionError",
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "OperationalError",
        }
    )

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Any = None,
    ) -> RetryDecision:
        notebook_error = getattr(exception, "ename", None)
        name = notebook_error or type(exception).__name__
        if name in self.GATE_ERRORS:
            return RetryDecision.fail(f"{name}: a failed quality gate is not retried")
        if notebook_error and notebook_error not in self.TRANSIENT_ERRORS:
            return RetryDecision.fail(f"the notebook raised {name}, which is not transient")
        return RetryDecision.default()

    def serialize(self) -> dict[str, Any]:
        return {"gate_errors": sorted(self.GATE_ERRORS)}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> GateRetryPolicy:
        return cls()


def io_retries(settings: Settings | None = None) -> dict[str, Any]:
    """Retry arguments of the I/O steps: exponential backoff from the settings' delay; no
    retry of a failed quality gate or a non-transient notebook error (:class:`GateRetryPolicy`)."""
    settings = settings or _settings()
    delay = timedelta(seconds=settings.orchestration.pipeline_retry_delay_s)
    return {
        "retries": settings.orchestration.pipeline_retries,
        "retry_delay": delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": max(delay * 8, timedelta(seconds=1)),
        "retry_policy": GateRetryPolicy(),
    }


# --- helpers -------------------------------------------------------------------------------


def _fail(message: str) -> Exception:
    """An exception that fails the task at once (no retry): a failed gate or a setup error."""
    # airflow.exceptions resolves AirflowFailException lazily (module __getattr__): Any to mypy
    return cast(Exception, AirflowFailException(message))


def _store(settings: Settings | None = None) -> Any:
    return open_store(settings=settings or _settings())


def _output_path(task: Any) -> Path | None:
    nb = getattr(task, "output_nb", None)
    url = getattr(nb, "url", nb)
    return Path(url) if isinstance(url, str) and url else None


def _store_notebook(context: Any) -> str | None:
    """Copy the executed notebook of this task into ``runs/<run id>/``; returns its URL."""
    path = _output_path(context["task"])
    if path is None or not path.exists():
        return None
    store = _store()
    key = run_prefix(context["run_id"]) + path.name
    store.put_file(key, path)
    return f"{store.url.rstrip('/')}/{key}"


def _mlflow_runs_of_task(context: Any) -> list[Any]:
    """MLflow runs the notebook of this task started (tagged through MLFLOW_RUN_CONTEXT)."""
    settings = _settings()
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
    client = registry.configure_mlflow(_settings())
    for run_id in run_ids:
        client.log_artifact(run_id, str(path), artifact_path="notebooks")
        client.set_tag(run_id, f"{NOTEBOOK_TAG}.{context['task'].task_id}", url)


def _run_context_tags(context: Any) -> dict[str, str]:
    from dandelion_lib.lifecycle import changes  # imports MLflow: not at DAG parse time

    ti = context["ti"]
    params = getattr(context["task"], "parameters", None) or {}
    tags = {
        DAG_ID_TAG: ti.dag_id,
        RUN_ID_TAG: context["run_id"],
        TASK_ID_TAG: ti.task_id,
        "airflow.try_number": str(ti.try_number),
        CODE_VERSION_TAG: changes.code_version(_settings(), _notebooks_dir(context)),
    }
    if params.get("dataset_version"):
        tags[DATASET_VERSION_TAG] = str(params["dataset_version"])
    return tags


# --- notebook hooks ------------------------------------------------------------------------


def prepare_notebook(context: Any) -> None:
    """``pre_execute`` of a notebook step (see the module docstring)."""
    from dandelion_lib import pipeline  # imports jupyter_client: not at DAG parse time

    task = context["task"]
    try:
        pipeline.check_kernel(task.kernel_name or _settings().orchestration.kernel_name)
    except pipeline.KernelMissingError as exc:
        raise _fail(str(exc)) from None
    if not Path(str(task.input_nb)).is_file():
        raise _fail(f"notebook {task.input_nb} not found (DANDELION_NOTEBOOKS_DIR)")
    overrides = (context["params"].get("notebook_params") or {}).get(task.task_id) or {}
    task.parameters = {**(task.parameters or {}), **overrides}
    output = _output_path(task)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(_run_context_tags(context))
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

    version = dataset.latest_version(_store())
    context["ti"].xcom_push(key="dataset_version", value=version)
    context["outlet_events"][DATASET_ASSET].extra = {"dataset_version": version}
    log.info("dataset version %s", version)


def _after_train(context: Any, runs: list[str], url: str | None) -> None:
    """Find the model version the training notebook registered; record its lineage."""
    settings = _settings()
    client = registry.configure_mlflow(settings)
    versions = [
        mv
        for run_id in runs
        for mv in client.search_model_versions(f"run_id = '{run_id}'")
        if mv.name == settings.tracking.model_name
    ]
    if not versions:
        raise _fail(
            f"the training notebook registered no version of model {settings.tracking.model_name!r} "
            f"(MLflow runs of this task: {runs or 'none'})"
        )
    mv = max(versions, key=lambda v: int(v.version))
    tags = _run_context_tags(context)
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
    _store().put_json(f"{prefix}failures/{record['task_id']}.json", record)
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
    store = _store()
    prefix = run_prefix(run_id)
    failures = [store.get_json(k) for k in store.list(f"{prefix}failures/") if k.endswith(".json")]
    failures = [f for f in failures if not f.get("will_retry")]
    lines = [f"dandelion: run {run_id} of {dag_run.dag_id} FAILED ({context.get('reason', '')})"]
    for f in failures:
        lines.append(f"  {f['task_id']}: {f['error']}")
        if f.get("notebook"):
            lines.append(f"    executed notebook: {f['notebook']}")
    look = where_to_look(_settings(), run_id)
    lines += [f"  {k}: {v}" for k, v in look.items()]
    text = "\n".join(lines)
    store.put_bytes(f"{prefix}FAILED.txt", (text + "\n").encode())
    log.error(text)


# --- Python steps --------------------------------------------------------------------------


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
    settings = _settings()
    added = None
    if settings.ingest.ingest_feedback:
        try:
            added = add_accepted_feedback(settings, store=_store(), progress=False)
        except SourceUnavailableError as exc:
            raise _fail(str(exc)) from None
    if added is not None:
        version = added.version
        log.info("accepted feedback added: dataset version %s (%s)", version, added.source)
    version = version or dataset.latest_version(_store())
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

    settings = _settings()
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
        report = datagate.validate_dataset(dataset_version or None, _settings())
    except datagate.DataValidationError as exc:
        raise _fail(str(exc)) from None
    context["ti"].xcom_push(key="dataset_version", value=report["dataset_version"])
    log.info("dataset %s passed validation: %s", report["dataset_version"], report)
    return report


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
            changes.code_version(_settings(), _notebooks_dir(context)),
        )
    else:
        decision = changes.decide_training(
            dataset_version,
            _settings(),
            force=bool(params.get("force_train")),
            notebooks_dir=_notebooks_dir(context),
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
    tasks = extract.write_plan(config, _settings(), str(context.get("run_id") or "manual"))
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
        counts = extract.extract_part(config, part, index, _settings())
    else:
        counts = extract.extract_shard_range(config, first, stop, _settings())
    log.info("dataset %s shards %d-%d: %s", dataset_version, first, stop - 1, counts)
    return counts


def promote(model_version: str, dataset_version: str, **context: Any) -> dict[str, Any]:
    """The model gate: move ``champion`` only if the challenger passes; no retry on rejection."""
    from dandelion_lib.lifecycle import promotion  # imports MLflow: not at DAG parse time

    settings = _settings()
    client = registry.configure_mlflow(settings)
    challenger = registry.get_alias_version(
        client, settings.tracking.model_name, registry.CHALLENGER
    )
    if challenger is None or str(challenger.version) != str(model_version):
        raise _fail(
            f"{settings.tracking.model_name}@{registry.CHALLENGER} is "
            f"{'missing' if challenger is None else f'version {challenger.version}'}, "
            f"not the version {model_version} trained in this run"
        )
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps(_run_context_tags(context))
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
        raise _fail(
            f"{settings.tracking.model_name} version {model_version} not promoted: {outcome['reason']}"
        )
    return outcome


def report(**context: Any) -> dict[str, Any]:
    """Final step (runs whatever happened before): write and log the run summary."""
    ti = context["ti"]
    run_id = context["run_id"]
    settings = _settings()
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {})
    store = _store(settings)
    prefix = run_prefix(run_id)
    failures = [store.get_json(k) for k in store.list(f"{prefix}failures/") if k.endswith(".json")]
    failed = {t for t, s in states.items() if s in ("failed", "upstream_failed")}
    summary: dict[str, Any] = {
        "dag_id": ti.dag_id,
        "run_id": run_id,
        "status": "failed" if failed else "succeeded",
        "task_states": states,
        "failures": [f for f in failures if f["task_id"] in failed],
        "trigger": context["params"].get("trigger") or "",
    }
    version = ti.xcom_pull(task_ids="validate_data", key="dataset_version") or ti.xcom_pull(
        task_ids=["ingest", "resolve_dataset"], key="dataset_version"
    )
    if isinstance(version, list):
        version = next((v for v in version if v), None)
    summary["dataset_version"] = version
    counts = ti.xcom_pull(task_ids="validate_data")
    if counts:
        summary["counts"] = {
            k: counts[k]
            for k in ("images", "labels", "negatives", "splits", "origins", "rejected_at_ingest")
            if k in counts
        }
    summary["training"] = ti.xcom_pull(task_ids="check_changes", key="decision")
    shards = ti.xcom_pull(task_ids="extract_features")
    if shards:  # one dict per mapped task (a single task's return value is not a list)
        shards = shards if isinstance(shards, list) else [shards]
        summary["features"] = feature_totals([s for s in shards if isinstance(s, dict)])
    summary["promotion"] = ti.xcom_pull(task_ids="promote", key="promotion")
    trained = ti.xcom_pull(task_ids="train", key="model_version")
    summary.update(model_summary(settings, trained))
    if summary["training"] and not summary["training"]["train"] and not summary["promotion"]:
        champion = summary["training"].get("champion_version")
        summary["promotion"] = {
            "promoted": False,
            "reason": "training skipped"
            + (f"; champion stays version {champion}" if champion else ""),
        }
    summary["notebooks"] = [k for k in store.list(prefix) if k.endswith(".ipynb")]
    summary["look"] = where_to_look(settings, run_id)
    store.put_json(f"{prefix}summary.json", summary)
    store.put_json("runs/latest", {"run_id": run_id, "trigger": summary["trigger"]})
    log.info("\n%s", format_summary(summary))
    return {"status": summary["status"]}
