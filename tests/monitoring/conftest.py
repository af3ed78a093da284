"""Fixtures of the monitoring tests: image sets, a drift reference, a registered model,
and the Prometheus tools (Debian's ``prometheus`` package, installed by
``scripts/install-system-deps.sh``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from monitoring_support import darken, grayscale

from dandelion_lib.core.features import image_stats
from dandelion_lib.core.images import decode_image
from dandelion_lib.lifecycle.monitoring import build_reference

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
MODEL_NAME = "dandelion-drift-test"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `bash scripts/install-system-deps.sh`")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _tool("prometheus")


@pytest.fixture(scope="session")
def reference_paths(greenr_dir: Path) -> list[Path]:
    """Every other image of each label: the 'training split' of these tests (200 images)."""
    return [
        p
        for label in ("dandelion", "grass")
        for p in sorted((greenr_dir / label).glob("*.jpg"))[::2]
    ]


@pytest.fixture(scope="session")
def heldout_paths(greenr_dir: Path) -> list[Path]:
    """The other half of the reference dataset: in-distribution, never in the reference."""
    return [
        p
        for label in ("dandelion", "grass")
        for p in sorted((greenr_dir / label).glob("*.jpg"))[1::2]
    ]


@pytest.fixture(scope="session")
def drift_reference(reference_paths: list[Path]) -> dict:
    rows = [image_stats(decode_image(p.read_bytes())) for p in reference_paths]
    return build_reference({k: [r[k] for r in rows] for k in rows[0]})


def _write_variants(paths: list[Path], out: Path, transform) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        img = transform(decode_image(p.read_bytes()))
        img.save(out / f"{p.parent.name}-{p.stem}.jpg", quality=90)
    return out


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory: pytest.TempPathFactory, heldout_paths: list[Path]) -> Path:
    """60 in-distribution images (30 per label), unchanged."""
    subset = heldout_paths[:30] + heldout_paths[-30:]
    return _write_variants(subset, tmp_path_factory.mktemp("heldout"), lambda img: img)


@pytest.fixture(scope="session")
def dark_dir(tmp_path_factory: pytest.TempPathFactory, heldout_paths: list[Path]) -> Path:
    subset = heldout_paths[:20] + heldout_paths[-20:]
    return _write_variants(subset, tmp_path_factory.mktemp("dark"), darken)


@pytest.fixture(scope="session")
def gray_dir(tmp_path_factory: pytest.TempPathFactory, heldout_paths: list[Path]) -> Path:
    subset = heldout_paths[:20] + heldout_paths[-20:]
    return _write_variants(subset, tmp_path_factory.mktemp("gray"), grayscale)


@pytest.fixture(scope="session")
def registered_model(mlflow_server: str, drift_reference: dict) -> Iterator[str]:
    """A tiny Keras model (built-in layers only) logged with ``registry.log_keras_model``
    and the drift reference above, registered and aliased ``champion`` in the real MLflow
    server. Yields the model URI; the tracking URI is ``mlflow_server``."""
    import keras
    import mlflow

    from dandelion_lib.core.config import Settings
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.lifecycle.registry import configure_mlflow, log_keras_model

    previous = mlflow.get_tracking_uri()
    client = configure_mlflow(Settings(tracking_uri=mlflow_server))
    size = FeatureSpec().image_size
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    mlflow.set_experiment("dandelion-monitoring-tests")
    with mlflow.start_run():
        mv = log_keras_model(
            model,
            feature_spec=FeatureSpec().to_dict(),
            drift_reference=drift_reference,
            metrics={"test_accuracy": 0.5},
            dataset_version="test",
            registered_model_name=MODEL_NAME,
        )
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    try:
        yield f"models:/{MODEL_NAME}@champion"
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)
