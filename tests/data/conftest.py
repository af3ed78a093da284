"""The dataset under test: the reference images ingested into a scratch store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import dataset
from dandelion_lib.data.ingest import ingest


@pytest.fixture(scope="session")
def data_settings(tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path) -> Settings:
    return Settings(workdir=tmp_path_factory.mktemp("data"), source=str(greenr_dir))


@pytest.fixture(scope="session")
def data_store(data_settings: Settings) -> LocalStore:
    store = LocalStore(data_settings.storage.workdir / "store")
    ingest(data_settings, store=store, progress=False)
    return store


@pytest.fixture(scope="session")
def manifest(data_store: LocalStore) -> pd.DataFrame:
    return dataset.load_manifest(data_store)
