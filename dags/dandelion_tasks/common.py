"""What every part of the DAGs' Airflow glue shares: the assets, the settings and the store of
the running task, the ``{{ dandelion.* }}`` template macros, and the MLflow run-context tags.

Nothing heavy is imported here: the DAG files import this module at parse time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from airflow.exceptions import AirflowFailException
from airflow.sdk import Asset

from dandelion_lib.core.config import Settings, get_settings
from dandelion_lib.core.runs import (
    CODE_VERSION_TAG,
    DAG_ID_TAG,
    DATASET_VERSION_TAG,
    NOTEBOOKS,
    RUN_ID_TAG,
    TASK_ID_TAG,
    run_key,
)
from dandelion_lib.core.storage import open_store

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


def current_settings() -> Settings:
    """The settings of the running task (the environment Airflow gives it)."""
    return get_settings()


def fail(message: str) -> Exception:
    """An exception that fails the task at once (no retry): a failed gate or a setup error."""
    # airflow.exceptions resolves AirflowFailException lazily (module __getattr__): Any to mypy
    return cast(Exception, AirflowFailException(message))


def run_store(settings: Settings | None = None) -> Any:
    """The object store of the settings (the running task's by default)."""
    return open_store(settings=settings or current_settings())


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
            (current_settings().orchestration.notebooks_dir or self.default_notebooks)
            .expanduser()
            .resolve()
        )

    @staticmethod
    def store_url() -> str:
        return current_settings().resolved_store_url

    @staticmethod
    def tracking_uri() -> str:
        return current_settings().resolved_tracking_uri

    @staticmethod
    def source() -> str:
        return current_settings().ingest.source

    @staticmethod
    def model_name() -> str:
        return current_settings().tracking.model_name

    def notebook(self, task_id: str) -> str:
        """Absolute path of the notebook a step runs."""
        return str(self.notebooks_dir() / NOTEBOOKS[task_id])

    @staticmethod
    def output_notebook(run_id: str, task_id: str) -> str:
        """Local path papermill writes the executed notebook to."""
        runs = current_settings().workdir_path / "runs"
        return str(runs / run_key(run_id) / NOTEBOOKS[task_id])


def macros(dag_file: str) -> dict[str, Any]:
    """``user_defined_macros`` of a DAG defined in ``dag_file`` (in ``<repo>/dags/``)."""
    return {"dandelion": Macros(Path(dag_file).resolve().parents[1] / "notebooks")}


def notebooks_dir(context: Any) -> Path:
    """The notebooks folder of the running task's DAG (its macros), else the settings'."""
    dag = context.get("dag")
    found = (getattr(dag, "user_defined_macros", None) or {}).get("dandelion")
    if isinstance(found, Macros):
        return found.notebooks_dir()
    return current_settings().resolved_notebooks_dir


def run_context_tags(context: Any) -> dict[str, str]:
    """The tags of every MLflow run a step starts: the Airflow run, task and try, the code
    version, and the dataset version when the task has one (``MLFLOW_RUN_CONTEXT``)."""
    from dandelion_lib.lifecycle import changes  # imports MLflow: not at DAG parse time

    ti = context["ti"]
    params = getattr(context["task"], "parameters", None) or {}
    tags = {
        DAG_ID_TAG: ti.dag_id,
        RUN_ID_TAG: context["run_id"],
        TASK_ID_TAG: ti.task_id,
        "airflow.try_number": str(ti.try_number),
        CODE_VERSION_TAG: changes.code_version(current_settings(), notebooks_dir(context)),
    }
    if params.get("dataset_version"):
        tags[DATASET_VERSION_TAG] = str(params["dataset_version"])
    return tags
