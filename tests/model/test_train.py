"""Training: what one run logs to MLflow and registers (real MLflow on SQLite)."""

from __future__ import annotations

import dataclasses
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dandelion_lib.core.features import STAT_COLUMNS, FeatureSpec
from dandelion_lib.training.config import TrainConfig
from tests.model.conftest import tiny_config


def test_tiny_model_learns(lite0_trained: Any) -> None:
    """The real backbone's tiny model (the quality of the stand-in's says nothing)."""
    m = lite0_trained.metrics
    assert m["test_n"] == 60
    assert m["test_accuracy"] >= 0.9
    assert m["test_roc_auc"] >= 0.95
    assert 0.0 <= m["test_ece"] <= 0.2
    assert lite0_trained.model_version is not None
    assert lite0_trained.model_uri == f"models:/dandelion/{lite0_trained.model_version}"


def test_run_logs_params_epochs_and_dataset(
    trained: Any, mlflow_client: Any, model_env: Any
) -> None:
    run = mlflow_client.get_run(trained.run_id)
    # Embedded default: artifacts live in the work directory, not in ./mlruns of the caller.
    workdir = model_env.settings.workdir_path
    assert run.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())
    params = run.data.params
    for f in dataclasses.fields(TrainConfig):
        assert f.name in params, f.name
    assert params["max_images_per_class"] == "40"
    assert params["dataset_version_resolved"] == model_env.version
    assert params["images_train"] == "80"

    epochs = len(trained.history["loss"])
    assert epochs > 10
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = mlflow_client.get_metric_history(trained.run_id, key)
        assert [h.step for h in history] == list(range(epochs)), key

    (ds_input,) = run.inputs.dataset_inputs
    info = model_env.store.info(f"datasets/{model_env.version}/manifest.parquet")
    assert ds_input.dataset.name == f"dandelion@{model_env.version}"
    assert ds_input.dataset.digest == info.sha256[:32]
    tags = {t.key: t.value for t in ds_input.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["manifest_sha256"] == info.sha256
    assert run.data.tags["dataset_version"] == model_env.version


def test_run_logs_figures_and_test_metrics(trained: Any, mlflow_client: Any) -> None:
    files = {a.path for a in mlflow_client.list_artifacts(trained.run_id, "figures")}
    for name in (
        "learning_curves",
        "test_confusion_matrix",
        "test_roc",
        "test_calibration",
        "test_misclassified",
    ):
        assert f"figures/{name}.png" in files
    metrics = mlflow_client.get_run(trained.run_id).data.metrics
    for key in (
        "test_accuracy",
        "test_precision",
        "test_recall",
        "test_f1",
        "test_roc_auc",
        "test_ece",
    ):
        assert metrics[key] == pytest.approx(trained.metrics[key])
    assert any(k.startswith("test_slice_size_short_side") for k in metrics)
    assert metrics["train_seconds"] > 0


def test_registered_model_carries_contract_metadata(
    trained: Any, mlflow_client: Any, model_env: Any, tmp_path: Path
) -> None:
    import mlflow

    # Other model tests register later versions in the same registry, so look the
    # version up by number; the alias move itself is covered by the integration test.
    mv = mlflow_client.get_model_version("dandelion", trained.model_version)
    assert mv.run_id == trained.run_id
    local = mlflow.artifacts.download_artifacts(trained.model_uri, dst_path=str(tmp_path))
    mlmodel = mlflow.models.Model.load(local)
    meta = mlmodel.metadata
    assert meta["feature_spec"] == FeatureSpec().to_dict()
    assert meta["dataset_version"] == model_env.version
    assert meta["metrics"]["test_accuracy"] == pytest.approx(trained.metrics["test_accuracy"])
    ref = meta["drift_reference"]["features"]
    assert sorted(ref) == sorted(STAT_COLUMNS)
    assert all(f["count"] == 80 for f in ref.values())
    assert all(sum(f["proportions"]) == pytest.approx(1.0) for f in ref.values())
    # Signature and input example (the keras flavor of this MLflow release needs help here).
    inputs = mlmodel.signature.inputs.to_dict()[0]
    size = FeatureSpec().image_size
    assert list(inputs["tensor-spec"]["shape"]) == [-1, size, size, 3]
    example = mlmodel.load_input_example(local)
    assert np.asarray(example).shape == (1, size, size, 3)
    assert "keras" in mlmodel.flavors
    requirements = (Path(local) / "requirements.txt").read_text()
    assert "keras==" in requirements and "mlflow==" in requirements


def test_offline_keras_backbone_fails_in_one_line_before_any_run(
    model_env: Any, mlflow_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`dandelion train --backbone mobilenet_v2` with no network: one line, exit 2, no run.

    Offline is made real: Keras' home (read once at import) points at an empty folder and
    the proxy variables at a closed loopback port, so no download can succeed."""
    from dandelion_lib import cli
    from dandelion_lib.core.config import get_settings

    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras"))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen builds its global opener, proxies included, once: drop the one built here.
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("DANDELION_WORKDIR", str(model_env.settings.storage.workdir))
    monkeypatch.setenv("DANDELION_STORE_URL", model_env.settings.resolved_store_url)
    get_settings.cache_clear()
    experiment = mlflow_client.get_experiment_by_name("dandelion").experiment_id
    runs_before = len(mlflow_client.search_runs([experiment]))
    try:
        code = cli.main(["train", "--backbone", "mobilenet_v2"])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dandelion train: error: ")
    assert "mobilenet_v2" in err[0] and "efficientnet_lite0" in err[0]
    assert len(mlflow_client.search_runs([experiment])) == runs_before


def test_training_is_deterministic_for_a_seed(trained: Any, model_env: Any) -> None:
    """Same data, config and seed: identical weights; another seed: different augmented
    views, so a different head (the comparison is not vacuous)."""
    from dandelion_lib.lifecycle.train import train

    assert trained.model is not None
    again = train(
        tiny_config(register=False),
        model_env.settings,
        store=model_env.store,
        progress=False,
    )
    for a, b in zip(trained.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.metrics == trained.metrics

    other = train(
        tiny_config(seed=8, register=False),
        model_env.settings,
        store=model_env.store,
        progress=False,
    )
    head, other_head = trained.model.get_layer("head"), other.model.get_layer("head")
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(head.get_weights(), other_head.get_weights(), strict=True)
    )
