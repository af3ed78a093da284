"""Model-test fixtures: the ported backbone, an ingested reference dataset (with the ood-dev
photos as its ``negatives`` source), one tiny trained model with its open-set detector
(shared by every model test) and its Predictor loaded back from the registry.

Everything is real: the local object store, SQLite-backed MLflow under a temporary work
directory, the reference images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.config import Settings

TINY_PER_CLASS = 40
"""Images per class and split for the shared tiny model (train 80, val 60, test 60)."""


def tiny_config(**changes: Any) -> Any:
    """The shared tiny model's training config (``changes`` override fields)."""
    from dandelion_lib.lifecycle.train import TrainConfig

    fields = {"max_images_per_class": TINY_PER_CLASS, "augment_copies": 1, "seed": 7}
    return TrainConfig(**(fields | changes))


@dataclass
class ModelEnv:
    settings: Settings
    store: Any
    version: str
    manifest: Any


@pytest.fixture(scope="session")
def lite0() -> Any:
    """The pure-Keras EfficientNet-Lite0 with the packaged ImageNet weights."""
    from dandelion_lib.training.model import build_efficientnet_lite0

    model = build_efficientnet_lite0(weights=True)
    model.trainable = False
    return model


@pytest.fixture(scope="session")
def model_env(
    tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path, ood_dir: Path
) -> ModelEnv:
    """The reference dataset and the ood-dev negatives ingested into a local store; MLflow on
    SQLite beside it."""
    from dandelion_lib.core.storage import open_store
    from dandelion_lib.data import dataset
    from dandelion_lib.data.ingest import ingest

    work = tmp_path_factory.mktemp("model-work")
    settings = Settings(
        workdir=work, store_url=(work / "store").as_uri(), negatives_source=str(ood_dir)
    )
    store = open_store(settings=settings)
    report = ingest(settings, source=str(greenr_dir), store=store, progress=False)
    return ModelEnv(settings, store, report.version, dataset.load_manifest(store, report.version))


@pytest.fixture(scope="session")
def trained(model_env: ModelEnv) -> Any:
    """One tiny model trained on a subset, logged and registered (alias challenger)."""
    from dandelion_lib.lifecycle.train import train

    return train(tiny_config(), model_env.settings, store=model_env.store, progress=False)


@pytest.fixture
def mlflow_client(model_env: ModelEnv) -> Any:
    """An MLflow client on the model tests' tracking URI (also set as MLflow's global one)."""
    from dandelion_lib.lifecycle.registry import configure_mlflow

    return configure_mlflow(model_env.settings)


@pytest.fixture(scope="session")
def predictor(model_env: ModelEnv, trained: Any) -> Any:
    """The tiny model loaded back from the registry, as the API serves it."""
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import Predictor

    configure_mlflow(model_env.settings)
    return Predictor.load(trained.model_uri)


@pytest.fixture(scope="session")
def test_split(model_env: ModelEnv) -> Any:
    """The full test split of the reference dataset version (manifest rows, sha256 order;
    in-domain photos only)."""
    m = model_env.manifest
    m = m[(m["split"] == "test") & (m["label"] != "unknown")]
    return m.sort_values("sha256").reset_index(drop=True)
