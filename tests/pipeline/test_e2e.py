"""End to end: ``airflow dags test dandelion_pipeline`` with the real notebooks.

A subset of the reference images is served on loopback HTTP; the source drops the first
connection (an outage that ends), so ingestion fails once and Airflow's retry succeeds. Then,
through ``dandelion pipeline`` (what ``nox -s pipeline`` runs): a re-run with nothing changed
skips training, and a run whose quality gate cannot pass ends without promotion, exits
non-zero and leaves the champion where it was. The promotion floor is lowered to
0.8 for the first run because the test split of the subset is small. A few ood-dev photos are
the ``negatives`` source, so the champion ships an open-set detector fitted on them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.lifecycle.registry import configure_mlflow
from tests.pipeline.conftest import dags_test, serve

pytestmark = pytest.mark.slow

PER_CLASS = 40
NOTEBOOKS = ("01_ingest.ipynb", "02_train.ipynb", "03_evaluate.ipynb")


@dataclass
class Run:
    rc: int
    log: str
    run_key: str
    summary: dict[str, Any]
    airflow_log: str = ""


class Pipeline:
    """One embedded Airflow + work dir; runs ``dandelion_pipeline`` and reads its results."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.settings = Settings(workdir=Path(env["DANDELION_WORKDIR"]))
        self.store = LocalStore(self.settings.workdir_path / "store")
        uri = self.settings.resolved_tracking_uri
        # Both URIs explicit: other tests in the same process may have set global ones.
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def run(self, conf: dict[str, Any] | None = None, **env: str) -> Run:
        proc = dags_test("dandelion_pipeline", {**self.env, **env}, conf or {}, cwd=self.root)
        latest = self.store.get_json("runs/latest")
        key = latest["run_id"].replace(":", "_").replace("+", "_")
        summary = self.store.get_json(f"runs/{key}/summary.json")
        return Run(proc.returncode, proc.stdout + proc.stderr, key, summary)

    def cli(self, *args: str, **env: str) -> Run:
        """``dandelion pipeline`` (what ``nox -s pipeline`` runs): its output and exit code."""
        proc = subprocess.run(
            [sys.executable, "-m", "dandelion_lib.cli", "pipeline", *args],
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        output = proc.stdout + proc.stderr
        log_file = Path(output.split("(log: ", 1)[1].split(")", 1)[0])
        latest = self.store.get_json("runs/latest")
        key = latest["run_id"].replace(":", "_").replace("+", "_")
        summary = self.store.get_json(f"runs/{key}/summary.json")
        return Run(proc.returncode, output, key, summary, log_file.read_text())

    def alias(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias("dandelion", alias).version)
        except Exception:
            return None


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env_factory: Callable[[Path], dict[str, str]],
    greenr_dir: Path,
    ood_dir: Path,
) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("e2e")
    negatives = root / "negatives"
    for kind in ("objects", "daisy"):
        (negatives / kind).mkdir(parents=True)
        for photo in sorted((ood_dir / kind).glob("*.jpg"))[:10]:
            shutil.copy(photo, negatives / kind / photo.name)
    url, stop = serve(greenr_dir, drop_first=1)
    env = pipeline_env_factory(root)
    env.update(
        {
            "DANDELION_SOURCE": url,
            "DANDELION_NEGATIVES_SOURCE": str(negatives),
            "DANDELION_SOURCE_COUNT": str(PER_CLASS),
            "DANDELION_HTTP_RETRIES": "0",
            "DANDELION_MIN_IMAGES_PER_CLASS": "10",
            "DANDELION_PROMOTION_FLOOR": "0.8",
        }
    )
    try:
        yield Pipeline(root, env)
    finally:
        stop()


@pytest.fixture(scope="module")
def first(pipeline: Pipeline) -> Run:
    return pipeline.run()


def test_first_run_succeeds_after_retrying_the_source_outage(first: Run) -> None:
    assert first.rc == 0, first.log[-5000:]
    assert first.summary["status"] == "succeeded"
    assert "dandelion: step 'ingest' failed (try 1), will retry" in first.log
    assert first.summary["task_states"]["ingest"] == "success"


def test_dataset_version_in_the_store(pipeline: Pipeline, first: Run) -> None:
    version = pipeline.store.get_json("datasets/latest")["version"]
    assert first.summary["dataset_version"] == version
    assert pipeline.store.exists(f"datasets/{version}/manifest.parquet")
    assert first.summary["counts"]["labels"] == {"dandelion": PER_CLASS, "grass": PER_CLASS}


def test_ingestion_emitted_the_dataset_asset_for_retraining(pipeline: Pipeline, first: Run) -> None:
    db = Path(pipeline.env["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(db) as con:
        events = con.execute(
            "select a.name, e.extra, e.source_dag_id, e.source_task_id from asset_event e "
            "join asset a on a.id = e.asset_id"
        ).fetchall()
        queued = con.execute(
            "select q.target_dag_id from asset_dag_run_queue q join asset a on a.id = q.asset_id"
        ).fetchall()
    version = first.summary["dataset_version"]
    assert [(n, json.loads(x), d, t) for n, x, d, t in events] == [
        ("dandelion_dataset", {"dataset_version": version}, "dandelion_pipeline", "ingest")
    ]
    assert queued == [("dandelion_retrain",)], "the retraining DAG is scheduled on the asset"


def test_mlflow_run_with_metrics_and_linked_notebooks(pipeline: Pipeline, first: Run) -> None:
    model = first.summary["model"]
    run = pipeline.client.get_run(model["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] >= 0.8
    assert run.data.tags["airflow.task_id"] == "train"
    assert run.data.tags["dandelion.dataset_version"] == first.summary["dataset_version"]
    artifacts = [a.path for a in pipeline.client.list_artifacts(run.info.run_id, "notebooks")]
    assert "notebooks/02_train.ipynb" in artifacts


def test_registered_version_is_champion(pipeline: Pipeline, first: Run) -> None:
    version = first.summary["model"]["version"]
    assert pipeline.alias("champion") == version == pipeline.alias("challenger")
    assert first.summary["promotion"]["promoted"] is True
    mv = pipeline.client.get_model_version("dandelion", version)
    assert mv.tags["dandelion.dataset_version"] == first.summary["dataset_version"]
    assert len(mv.tags["dandelion.code_version"]) == 12


def test_champion_ships_its_open_set_detector(pipeline: Pipeline, first: Run) -> None:
    import mlflow

    assert first.summary["counts"]["negatives"] == 20
    model = first.summary["model"]
    run = pipeline.client.get_run(model["mlflow_run_id"])
    assert run.data.params["openset_method_resolved"] == "logistic"
    assert run.data.params["negatives_train"] == "10"
    assert 0.0 <= run.data.metrics["test_ood_unknown_share"] <= 1.0
    mv = pipeline.client.get_model_version("dandelion", model["version"])
    assert mv.tags["promotion.challenger_ood_unknown_share"] != "none"
    # Through the library's one place that points MLflow at a store: an earlier test in the same
    # process may have left another registry URI set globally.
    configure_mlflow(pipeline.settings)
    local = mlflow.artifacts.download_artifacts(f"models:/dandelion/{model['version']}")
    assert (Path(local) / "openset.npz").is_file()


def test_executed_notebooks_stored(pipeline: Pipeline, first: Run) -> None:
    for name in NOTEBOOKS:
        nb = json.loads(pipeline.store.get_bytes(f"runs/{first.run_key}/{name}"))
        assert any(c.get("outputs") for c in nb["cells"]), f"{name} was not executed"
        tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
        assert ["injected-parameters"] in tags, name


@pytest.fixture(scope="module")
def rerun(pipeline: Pipeline, first: Run) -> Run:
    return pipeline.cli()


def test_rerun_with_nothing_changed_skips_training(
    pipeline: Pipeline, first: Run, rerun: Run
) -> None:
    assert rerun.rc == 0, rerun.log[-5000:]
    assert rerun.summary["dataset_version"] == first.summary["dataset_version"]
    assert rerun.summary["training"]["train"] is False
    assert "unchanged since champion" in rerun.summary["training"]["reason"]
    states = rerun.summary["task_states"]
    assert states["train"] == states["evaluate"] == states["promote"] == "skipped"
    assert pipeline.alias("champion") == first.summary["model"]["version"]
    # what the user sees at the end of `nox -s pipeline`
    assert "dandelion pipeline: SUCCEEDED" in rerun.log
    assert "  training   skipped: dataset " in rerun.log
    assert f"  model      dandelion version {first.summary['model']['version']}" in rerun.log
    assert "  mlflow     mlflow ui --backend-store-uri sqlite:///" in rerun.log
    assert "Airflow DB migrated" not in rerun.log


@pytest.fixture(scope="module")
def gated(pipeline: Pipeline, rerun: Run) -> Run:
    return pipeline.cli("--force-train", DANDELION_PROMOTION_FLOOR="1.01")


def test_failing_gate_ends_the_run_and_keeps_the_champion(
    pipeline: Pipeline, first: Run, gated: Run
) -> None:
    assert gated.rc != 0
    assert gated.summary["status"] == "failed"
    assert gated.summary["task_states"]["promote"] == "failed"
    assert gated.summary["promotion"]["promoted"] is False
    assert "below the floor" in gated.summary["promotion"]["reason"]
    champion = first.summary["model"]["version"]
    assert pipeline.alias("champion") == champion
    assert gated.summary["model"]["version"] != champion
    failure = pipeline.store.get_json(f"runs/{gated.run_key}/failures/promote.json")
    assert failure["try_number"] == 1, "a failed gate must not be retried"
    assert "dandelion: step 'promote' failed (try 1)\n" in gated.airflow_log
    assert pipeline.store.exists(f"runs/{gated.run_key}/FAILED.txt")
    assert "dandelion pipeline: FAILED" in gated.log and "  promotion  not promoted: " in gated.log


def test_retraining_dag_skips_when_nothing_changed(
    pipeline: Pipeline, first: Run, gated: Run
) -> None:
    """A weekly (time-triggered) retraining run: latest dataset, same code as the champion."""
    proc = dags_test("dandelion_retrain", pipeline.env, cwd=pipeline.root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    latest = pipeline.store.get_json("runs/latest")
    summary = pipeline.store.get_json(
        f"runs/{latest['run_id'].replace(':', '_').replace('+', '_')}/summary.json"
    )
    assert summary["dag_id"] == "dandelion_retrain" and summary["status"] == "succeeded"
    assert summary["dataset_version"] == first.summary["dataset_version"]
    assert summary["training"]["train"] is False
    assert summary["task_states"]["train"] == "skipped"
    assert pipeline.alias("champion") == first.summary["model"]["version"]
