"""Run names (dandelion_lib.core.runs): store-safe keys and the notebooks the DAG steps run."""

from __future__ import annotations

from pathlib import Path

from dandelion_lib.core.runs import NOTEBOOKS, run_key, run_prefix

ROOT = Path(__file__).resolve().parents[2]


def test_run_keys_are_store_safe() -> None:
    run_id = "manual__2026-01-01T00:00:00+00:00"
    assert run_key(run_id) == "manual__2026-01-01T00_00_00_00_00"
    assert run_prefix(run_id) == f"runs/{run_key(run_id)}/"


def test_every_step_notebook_exists() -> None:
    assert all((ROOT / "notebooks" / name).is_file() for name in NOTEBOOKS.values())
