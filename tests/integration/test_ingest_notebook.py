"""notebooks/01_ingest.ipynb runs end to end under Papermill with the dandelion kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data import dataset
from tests.notebook_support import ROOT, assert_clean_and_parameterized, outputs, run_papermill

NOTEBOOK = ROOT / "notebooks" / "01_ingest.ipynb"


def test_notebook_is_stored_clean_and_parameterized() -> None:
    assert_clean_and_parameterized(NOTEBOOK)


@pytest.mark.slow  # a kernel importing the library, then an ingest: about 20 s
def test_notebook_runs_with_papermill(greenr_dir: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    args = ["-p", "source", str(greenr_dir), "-p", "store_url", store_dir.as_uri()]
    args += ["-p", "max_per_class", "25", "-p", "min_images_per_class", "5"]
    executed = run_papermill(
        NOTEBOOK,
        tmp_path / "01_ingest.out.ipynb",
        *args,
        env={"DANDELION_WORKDIR": str(tmp_path / "work")},
        timeout=300,
    )
    store = LocalStore(store_dir)
    assert len(dataset.load_manifest(store)) == 50
    text, images = outputs(executed)
    assert images == 3  # samples, distributions, statistics
    assert f"dataset version {dataset.latest_version(store)} (new)" in text
