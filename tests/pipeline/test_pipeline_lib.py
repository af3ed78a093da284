"""The orchestration logic of dandelion_lib.pipeline, against real components.

Dataset checks run on a manifest produced by the real ingestion of reference images;
change detection runs against a real MLflow registry (SQLite) and real notebooks on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from mlflow import MlflowClient
from papermill.exceptions import PapermillExecutionError

from dandelion_lib import pipeline, summary
from dandelion_lib.core import runs
from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import datagate
from dandelion_lib.data.ingest import ingest
from dandelion_lib.lifecycle import changes
from dandelion_tasks.hooks import _one_line
from dandelion_tasks.retries import GateRetryPolicy


def test_run_key_is_store_safe() -> None:
    assert runs.run_key("manual__2026-01-01T00:00:00.5+00:00") == (
        "manual__2026-01-01T00_00_00.5_00_00"
    )
    assert runs.run_prefix("scheduled__x") == "runs/scheduled__x/"


# --- code version --------------------------------------------------------------------------


def _notebook(path: Path, code: str, output: str = "") -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(code)
    if output:
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), cell]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_code_version_follows_notebook_code_not_outputs(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path / "w", notebooks_dir=tmp_path / "nb")
    _notebook(tmp_path / "nb" / "02_train.ipynb", "epochs = 3")
    _notebook(tmp_path / "nb" / "03_evaluate.ipynb", "x = 1")
    first = changes.code_version(settings)
    assert len(first) == 12 and first == changes.code_version(settings)

    _notebook(tmp_path / "nb" / "02_train.ipynb", "epochs = 3", output="loss 0.1")
    assert changes.code_version(settings) == first, "outputs are not code"
    _notebook(tmp_path / "nb" / "01_ingest.ipynb", "anything = 1")
    assert changes.code_version(settings) == first, "ingestion does not shape the model"

    _notebook(tmp_path / "nb" / "02_train.ipynb", "epochs = 4")
    assert changes.code_version(settings) != first


# --- kernel --------------------------------------------------------------------------------


def test_registered_kernel_is_found() -> None:
    assert (pipeline.check_kernel("dandelion") / "kernel.json").exists()


def test_missing_kernel_says_how_to_register_it() -> None:
    with pytest.raises(pipeline.KernelMissingError) as err:
        pipeline.check_kernel("no-such-kernel-here")
    assert "ipykernel install --sys-prefix --name no-such-kernel-here" in str(err.value)
    assert "\n" not in str(err.value)


def test_kernel_with_a_missing_python_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "jupyter" / "kernels" / "stale"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["/gone/bin/python", "-m", "ipykernel_launcher", "-f", "{x}"],
                "display_name": "stale",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    with pytest.raises(pipeline.KernelMissingError, match="missing Python"):
        pipeline.check_kernel("stale")


# --- data gate -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(
    tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path
) -> tuple[Settings, LocalStore, str]:
    """The first 12 reference images per label, ingested for real into a local store."""
    root = tmp_path_factory.mktemp("ingested")
    settings = Settings(
        workdir=root, source=str(greenr_dir), max_per_class=12, min_images_per_class=5
    )
    store = LocalStore(root / "store")
    report = ingest(settings, store=store, progress=False)
    assert report.version
    return settings, store, report.version


def test_validate_dataset_passes_and_counts(ingested: tuple[Settings, LocalStore, str]) -> None:
    settings, store, version = ingested
    result = datagate.validate_dataset(version, settings, store)
    assert result["dataset_version"] == version
    assert result["labels"] == {"dandelion": 12, "grass": 12}
    assert sum(result["splits"].values()) == result["images"] == 24
    assert result["rejected_at_ingest"] == 0
    assert datagate.validate_dataset(None, settings, store)["dataset_version"] == version


def _manifest(ingested: tuple[Settings, LocalStore, str]) -> tuple[Settings, pd.DataFrame]:
    from dandelion_lib.data.dataset import load_manifest

    settings, store, version = ingested
    return settings, load_manifest(store, version)


def test_gate_flags_a_near_duplicate_group_straddling_splits(
    ingested: tuple[Settings, LocalStore, str],
) -> None:
    settings, df = _manifest(ingested)
    assert datagate.check_manifest(df, settings) == []
    train = df.index[df["split"] == "train"][0]
    test = df.index[df["split"] == "test"][0]
    df.loc[test, "group"] = df.loc[train, "group"]
    assert datagate.check_manifest(df, settings) == ["1 near-duplicate groups straddle splits"]


def test_gate_flags_small_unbalanced_or_unknown_classes(
    ingested: tuple[Settings, LocalStore, str],
) -> None:
    settings, df = _manifest(ingested)
    strict = settings.updated(**{"min_images_per_class": 20, "max_class_imbalance": 1.5})
    grass = df[df["label"] == "grass"]
    dropped = df.drop(grass.index[grass["split"] == "train"][:7])  # 5 grass left
    problems = datagate.check_manifest(dropped, strict)
    assert "dandelion: 12 images < minimum 20" in problems
    assert "grass: 5 images < minimum 20" in problems
    assert "class imbalance 2.40 > 1.5" in problems

    renamed = df.copy()
    renamed.loc[renamed.index[0], "label"] = "daisy"
    assert "unknown labels ['daisy']" in datagate.check_manifest(renamed, settings)


def test_gate_flags_an_empty_split_class_and_duplicates(
    ingested: tuple[Settings, LocalStore, str],
) -> None:
    settings, df = _manifest(ingested)
    no_val_grass = df[~((df["split"] == "val") & (df["label"] == "grass"))]
    assert "split 'val' has no 'grass' image" in datagate.check_manifest(no_val_grass, settings)
    doubled = pd.concat([df, df.iloc[:1]])
    assert "1 duplicate images (sha256)" in datagate.check_manifest(doubled, settings)
    assert datagate.check_manifest(df.drop(columns=["split"]), settings) == [
        "manifest lacks columns ['split']"
    ]


def test_validate_dataset_raises_one_line_naming_the_problems(
    ingested: tuple[Settings, LocalStore, str],
) -> None:
    settings, store, version = ingested
    strict = settings.updated(**{"min_images_per_class": 50})
    with pytest.raises(datagate.DataValidationError) as err:
        datagate.validate_dataset(version, strict, store)
    assert str(err.value) == (
        f"dataset {version} failed validation: dandelion: 12 images < minimum 50; "
        "grass: 12 images < minimum 50"
    )


# --- skip if unchanged ---------------------------------------------------------------------


def _register_champion(settings: Settings, *, dataset: str, code: str, on_run: bool) -> str:
    """Register a model version (a real registry entry; no weights needed here)."""
    from dandelion_lib.lifecycle import registry

    client: MlflowClient = registry.configure_mlflow(settings)
    exp = client.get_experiment_by_name(settings.tracking.experiment) or client.get_experiment(
        client.create_experiment(settings.tracking.experiment)
    )
    lineage = {runs.DATASET_VERSION_TAG: dataset, runs.CODE_VERSION_TAG: code}
    run = client.create_run(exp.experiment_id, tags=lineage if on_run else {})
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{settings.tracking.model_name}'"):
        client.create_registered_model(settings.tracking.model_name)
    mv = client.create_model_version(
        settings.tracking.model_name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={} if on_run else lineage,
    )
    client.set_registered_model_alias(settings.tracking.model_name, "champion", mv.version)
    return str(mv.version)


def test_training_decisions(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path, notebooks_dir=tmp_path / "nb")
    code = changes.code_version(settings)

    first = changes.decide_training("a" * 16, settings)
    assert first.train and first.reason == "no dandelion@champion yet"
    assert first.code_version == code and first.champion_version is None

    v1 = _register_champion(settings, dataset="a" * 16, code=code, on_run=False)
    same = changes.decide_training("a" * 16, settings)
    assert not same.train and same.champion_version == v1
    assert same.reason == f"dataset {'a' * 16} and code {code} unchanged since champion v{v1}"
    assert changes.decide_training("a" * 16, settings, force=True).train

    new_data = changes.decide_training("b" * 16, settings)
    assert new_data.train and new_data.reason.startswith(f"new dataset version {'b' * 16}")

    v2 = _register_champion(settings, dataset="b" * 16, code="0" * 12, on_run=True)
    changed = changes.decide_training("b" * 16, settings)  # lineage read from the run's tags
    assert changed.train and changed.champion_version == v2
    assert changed.reason.startswith(f"code changed: {code}")


# --- retries, summary, embedded Airflow ----------------------------------------------------


def _papermill_error(ename: str) -> PapermillExecutionError:
    return PapermillExecutionError(0, 1, "ingest()", ename, "details", [])


@pytest.mark.parametrize(
    ("error", "action"),
    [
        (_papermill_error("DatasetQualityError"), "fail"),  # a gate inside a notebook
        (datagate.DataValidationError("bad"), "fail"),  # the data gate step
        (_papermill_error("NameError"), "fail"),  # a bug: re-running will not help
        (_papermill_error("ConnectionError"), "default"),
        (_papermill_error("SourceUnavailableError"), "default"),
        (_papermill_error("StoreUnavailableError"), "default"),
        (ConnectionError("reset"), "default"),
        (KeyError("x"), "default"),  # Python steps follow the task's retries
    ],
)
def test_retry_policy(error: BaseException, action: str) -> None:
    assert GateRetryPolicy().evaluate(error, 1, 3).action.value == action


def test_failure_records_name_the_notebook_error_in_one_line() -> None:
    error = PapermillExecutionError(
        3, 7, "ingest()", "SourceUnavailableError", "cannot reach http://x\nmore", ["tb"]
    )
    assert _one_line(error) == ("SourceUnavailableError: cannot reach http://x (notebook cell [7])")
    assert _one_line(ValueError("bad\nvalue")) == "ValueError: bad"


def test_summary_is_short_and_says_where_to_look(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path)
    record = {
        "status": "succeeded",
        "dag_id": "dandelion_pipeline",
        "run_id": "manual__x",
        "dataset_version": "0123456789abcdef",
        "counts": {
            "images": 400,
            "labels": {"dandelion": 200, "grass": 200},
            "splits": {"test": 60, "train": 280, "val": 60},
        },
        "training": {"train": True, "reason": "no dandelion@champion yet"},
        "model": {"name": "dandelion", "version": "1", "test_accuracy": 0.98333},
        "promotion": {"promoted": True, "reason": "accuracy 0.9833 >= floor 0.9000; no champion"},
        "aliases": {"champion": "1", "challenger": "1"},
        "look": summary.where_to_look(settings, "manual__x"),
    }
    text = summary.format_summary(record)
    assert "SUCCEEDED" in text
    assert "400 images (dandelion 200, grass 200; train 280 / val 60 / test 60)" in text
    assert "test accuracy 0.9833" in text
    assert "promoted: accuracy 0.9833" in text
    assert "champion -> v1" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in text
    assert f"{tmp_path / 'store'}/runs/manual__x/" in text
    assert len(text.splitlines()) <= 12


def test_airflow_env_is_embedded_under_the_workdir(tmp_path: Path) -> None:
    env = pipeline.airflow_env(Settings(workdir=tmp_path))
    assert env["AIRFLOW_HOME"] == str(tmp_path / "airflow")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path}/airflow/airflow.db"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert Path(env["AIRFLOW__CORE__DAGS_FOLDER"], "dandelion.py").is_file()


def test_pipeline_command_without_kernel_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DANDELION_WORKDIR": str(tmp_path), "DANDELION_KERNEL_NAME": "nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "dandelion_lib.cli", "pipeline"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("dandelion pipeline: error: Jupyter kernel 'nope' is not")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "airflow").exists(), "nothing started before the check"


def test_task_env_carries_dotenv_settings_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tasks run in the work dir: what the settings read here must still apply there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / ".env").write_text("DANDELION_MIN_IMAGES_PER_CLASS=7\nOTHER=1\n")
    monkeypatch.delenv("DANDELION_MIN_IMAGES_PER_CLASS", raising=False)
    settings = Settings(workdir=Path("w"), source="images", store_url="st")
    env = pipeline.task_env(settings)
    assert env["DANDELION_MIN_IMAGES_PER_CLASS"] == "7" and "OTHER" not in env
    assert env["DANDELION_SOURCE"] == str(tmp_path / "images")
    assert env["DANDELION_STORE_URL"] == (tmp_path / "st").as_uri()
    assert env["DANDELION_WORKDIR"] == str(tmp_path / "w")
    assert pipeline.task_env(settings, source="http://h/x")["DANDELION_SOURCE"] == "http://h/x"
    # buckets pass as they are; a local negatives folder is made absolute
    in_bucket = settings.updated(source="s3://b/lawn", negatives_source="s3://b/negatives")
    env = pipeline.task_env(in_bucket)
    assert env["DANDELION_SOURCE"] == "s3://b/lawn"
    assert env["DANDELION_NEGATIVES_SOURCE"] == "s3://b/negatives"
    local = pipeline.task_env(settings.updated(negatives_source="neg"))
    assert local["DANDELION_NEGATIVES_SOURCE"] == str(tmp_path / "neg")
