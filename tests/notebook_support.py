"""Notebooks under test: the committed form, and runs under Papermill in the dandelion kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def assert_clean_and_parameterized(path: Path) -> None:
    """Committed without outputs, first code cell tagged ``parameters``, dandelion kernel."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), path.name
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "dandelion"


def run_papermill(
    notebook: Path,
    out: Path,
    *params: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> nbformat.NotebookNode:
    """Execute ``notebook`` into ``out`` (``params``: papermill's ``-p NAME VALUE`` pairs)."""
    full_env = {
        **os.environ,
        "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(notebook), str(out), "-k", "dandelion", *params],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return nbformat.read(out, as_version=4)


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the code cells printed or displayed, and how many PNG images they showed."""
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outs)
    return text, sum("image/png" in o.get("data", {}) for o in outs)
