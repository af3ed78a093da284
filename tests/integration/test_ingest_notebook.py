"""notebooks/01_ingest.ipynb runs end to end under Papermill with the dandelion kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

from dandelion_lib import dataset
from dandelion_lib.storage import LocalStore

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "01_ingest.ipynb"


def test_notebook_is_stored_clean_and_parameterized() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "dandelion"


def test_notebook_runs_with_papermill(greenr_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "01_ingest.out.ipynb"
    store_dir = tmp_path / "store"
    env = {
        **os.environ,
        "JUPYTER_PATH": str(ROOT / ".venv" / "share" / "jupyter"),
        "PYTHONPATH": str(ROOT),
        "DANDELION_WORKDIR": str(tmp_path / "work"),
    }
    args = ["-p", "source", str(greenr_dir), "-p", "store_url", store_dir.as_uri()]
    args += ["-p", "max_per_class", "25", "-p", "min_images_per_class", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out), "-k", "dandelion", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = LocalStore(store_dir)
    assert len(dataset.load_manifest(store)) == 50
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # samples, distributions, statistics
    text = "".join(o.get("text", "") for o in outputs)
    assert f"dataset version {dataset.latest_version(store)} (new)" in text
