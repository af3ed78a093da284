"""The app notebook: stored clean, and it runs in the ``dandelion`` kernel without TensorFlow.

The notebook is executed as JupyterLab would run it (nbclient, kernel ``dandelion``) with
the API down: it must still build the app (banner, no exception) and keep the kernel small.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from dashboards.serve import NOTEBOOK
from tests.app.conftest import dead_url

HEAVY = ("tensorflow", "keras", "mlflow", "torch", "pandas", "sklearn")


def test_notebook_is_stored_clean() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "dandelion"
    assert nb["metadata"]["title"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_notebook_runs_in_a_small_kernel_when_the_api_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import sys\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "print(app.health.title, app.upload.disabled)\n"
            "app.stop()"
        )
    )
    monkeypatch.setenv("DANDELION_API_URL", dead_url())  # the kernel inherits it
    NotebookClient(nb, kernel_name="dandelion", timeout=120).execute()
    app_cell, probe = nb.cells[-2], nb.cells[-1]
    assert [o["output_type"] for o in app_cell.outputs] == ["execute_result"]
    assert "application/vnd.jupyter.widget-view+json" in app_cell.outputs[0]["data"]
    assert probe.outputs[0]["text"].splitlines() == ["[]", "API unavailable True"]
