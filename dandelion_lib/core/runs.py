"""The names of a pipeline run: DAG ids, the notebook of each step, MLflow tags, store prefix.

Its one job is naming, so that the DAGs, the change detection, the run summary and the
embedded runner agree on every name without importing each other.
"""

from __future__ import annotations

import re

PIPELINE_DAG = "dandelion_pipeline"
RETRAIN_DAG = "dandelion_retrain"
NOTEBOOKS = {
    "ingest": "01_ingest.ipynb",
    "train": "02_train.ipynb",
    "evaluate": "03_evaluate.ipynb",
}
"""Notebook run by each notebook step of the DAGs."""

CODE_VERSION_TAG = "dandelion.code_version"
DATASET_VERSION_TAG = "dandelion.dataset_version"
NOTEBOOK_TAG = "dandelion.notebooks"
RUN_ID_TAG = "airflow.run_id"
TASK_ID_TAG = "airflow.task_id"
DAG_ID_TAG = "airflow.dag_id"


def run_key(run_id: str) -> str:
    """Store-safe form of an Airflow run id (``manual__2026-01-01T00:00:00+00:00``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def run_prefix(run_id: str) -> str:
    """Store prefix of one pipeline run: ``runs/<run key>/``."""
    return f"runs/{run_key(run_id)}/"
