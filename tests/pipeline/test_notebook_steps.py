"""Notebook steps under real Airflow + Papermill + the ``dandelion`` kernel.

The steps run small temporary notebooks (not the project's notebooks) through the same
``PapermillOperator`` settings and hooks as the DAGs, so the plumbing is checked in one short
``airflow dags test``: parameters rendered by Airflow and overridden per run, the executed
notebook kept in the store and linked from the MLflow run it started, a transient failure
retried, and a missing kernel failing at once with a message that says how to register it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import run_prefix
from dandelion_lib.core.storage import LocalStore
from tests.pipeline.conftest import dags_test

# Slow: one `airflow dags test` with papermill kernels and a retried step (about 2 minutes).
pytestmark = pytest.mark.slow

NOTEBOOK_BODY = """
from pathlib import Path
import mlflow
print("PARAMS", run_id, store_url, steps)
if fail_marker and not Path(fail_marker).exists():
    Path(fail_marker).write_text("failed once")
    raise ConnectionError("object store unreachable (transient)")
mlflow.set_tracking_uri(tracking_uri)
mlflow.set_experiment("dandelion")
with mlflow.start_run():
    mlflow.log_metric("steps", steps)
"""

DAG_FILE = """
from datetime import datetime
from airflow.providers.papermill.operators.papermill import PapermillOperator
from airflow.sdk import DAG
from dandelion_tasks import hooks
from dandelion_tasks.common import macros
from dandelion_tasks.retries import io_retries

with DAG(
    "notebook_steps",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    user_defined_macros=macros(__file__),
    on_failure_callback=hooks.on_run_failure,
    params={"notebook_params": {"evaluate": {"steps": 3}}},
    default_args={
        "on_failure_callback": hooks.on_task_failure,
        "on_retry_callback": hooks.on_task_retry,
    },
):
    for task_id, kernel in (("evaluate", "dandelion"), ("train", "no-such-kernel")):
        PapermillOperator(
            task_id=task_id,
            input_nb="{{ dandelion.notebook(task.task_id) }}",
            output_nb="{{ dandelion.output_notebook(run_id, task.task_id) }}",
            parameters={
                "run_id": "{{ run_id }}",
                "store_url": "{{ dandelion.store_url() }}",
                "tracking_uri": "{{ dandelion.tracking_uri() }}",
                "fail_marker": FAIL_MARKER,
            },
            kernel_name=kernel,
            language_name="python",
            do_xcom_push=False,
            pre_execute=hooks.prepare_notebook,
            post_execute=hooks.finish_notebook,
            **io_retries(),
        )
"""


def _write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        'run_id = ""\nstore_url = ""\ntracking_uri = ""\nfail_marker = ""\nsteps = 1'
    )
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(NOTEBOOK_BODY)]
    nb.metadata["kernelspec"] = {"name": "dandelion", "display_name": "d", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


class Run:
    def __init__(self, root: Path, env: dict[str, str], proc: subprocess.CompletedProcess[str]):
        self.root = root
        self.proc = proc
        self.settings = Settings(workdir=Path(env["DANDELION_WORKDIR"]))
        self.store = LocalStore(self.settings.workdir_path / "store")
        runs = {k.split("/")[1] for k in self.store.list("runs/")}
        assert len(runs) == 1, runs
        self.key = runs.pop()


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env_factory: Callable[[Path], dict[str, str]],
) -> Run:
    root = tmp_path_factory.mktemp("notebook-steps")
    env = pipeline_env_factory(root)
    for name in ("02_train.ipynb", "03_evaluate.ipynb"):
        _write_notebook(root / "notebooks" / name)
    dags = root / "dags"
    dags.mkdir()
    text = DAG_FILE.replace("FAIL_MARKER", repr(str(root / "failed-once")))
    (dags / "notebook_steps.py").write_text(text)
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    return Run(root, env, dags_test("notebook_steps", env, cwd=root))


def test_transient_failure_is_retried_and_succeeds(run: Run) -> None:
    assert (run.root / "failed-once").exists(), "the first try did not fail"
    failure = run.store.get_json(f"runs/{run.key}/failures/evaluate.json")
    assert failure["will_retry"] is True and failure["try_number"] == 1
    assert failure["error"].startswith(
        "ConnectionError: object store unreachable (transient) (notebook cell ["
    )
    log = run.proc.stdout + run.proc.stderr
    assert "dandelion: step 'evaluate' failed (try 1), will retry" in log
    # the retry succeeded: its notebook has no error and the MLflow run exists
    nb = nbformat.reads(run.store.get_bytes(f"runs/{run.key}/03_evaluate.ipynb").decode(), 4)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_parameters_rendered_by_airflow_with_per_run_overrides(run: Run) -> None:
    nb = nbformat.reads(run.store.get_bytes(f"runs/{run.key}/03_evaluate.ipynb").decode(), 4)
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    params_line = next(ln for ln in outputs.splitlines() if ln.startswith("PARAMS "))
    _, run_id, store_url, steps = params_line.split()
    assert run_id.startswith("manual__") and run_prefix(run_id) == f"runs/{run.key}/"
    assert store_url == run.settings.resolved_store_url
    assert steps == "3"  # the DAG param override, not the notebook default 1


def test_mlflow_run_tagged_and_links_the_executed_notebook(run: Run) -> None:
    client = MlflowClient(run.settings.resolved_tracking_uri)
    exp = client.get_experiment_by_name("dandelion")
    (mlrun,) = client.search_runs([exp.experiment_id])
    tags = mlrun.data.tags
    assert tags["airflow.dag_id"] == "notebook_steps" and tags["airflow.task_id"] == "evaluate"
    assert run.key in tags["airflow.run_id"].replace(":", "_").replace("+", "_")
    assert tags["airflow.try_number"] == "2"
    assert len(tags["dandelion.code_version"]) == 12
    assert tags["dandelion.notebooks.evaluate"] == (
        f"{run.store.url}/runs/{run.key}/03_evaluate.ipynb"
    )
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id, "notebooks")]
    assert artifacts == ["notebooks/03_evaluate.ipynb"]
    assert mlrun.data.metrics["steps"] == 3


def test_missing_kernel_fails_at_once_with_how_to_register(run: Run) -> None:
    assert run.proc.returncode != 0, "the run should fail: one step has no kernel"
    failure = run.store.get_json(f"runs/{run.key}/failures/train.json")
    assert failure["try_number"] == 1 and failure["will_retry"] is False
    assert "'no-such-kernel' is not registered" in failure["error"]
    assert "ipykernel install --sys-prefix --name no-such-kernel" in failure["error"]
    log = run.proc.stdout + run.proc.stderr
    assert "dandelion: step 'train' failed (try 1)\n" in log


def test_run_failure_callback_writes_a_summary(run: Run) -> None:
    text = run.store.get_bytes(f"runs/{run.key}/FAILED.txt").decode()
    assert "FAILED" in text and "train: AirflowFailException" in text
    assert "mlflow ui --backend-store-uri" in text
