"""DAG integrity: every DAG file imports cleanly, fast, and wires the expected task graph.

The DAG files are parsed in a fresh process the way Airflow's DAG processor does it: the
``airflow.*`` modules a file imports are pre-imported first (``parsing_pre_import_modules``),
then the file is parsed and timed (CPU time, so that a busy machine does not fail the test).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.runs import NOTEBOOKS
from dandelion_lib.pipeline import airflow_env

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
HEAVY = ("tensorflow", "keras", "mlflow", "pandas", "sklearn", "matplotlib", "pyarrow")

PARSE_SCRIPT = r"""
import importlib, json, sys, time
from pathlib import Path
from airflow.utils.file import iter_airflow_imports
from airflow.dag_processing.dagbag import DagBag

out = {"files": {}, "dags": {}}
for path in sorted(Path(sys.argv[1]).glob("*.py")):
    for module in iter_airflow_imports(str(path)):
        importlib.import_module(module)
    before = set(sys.modules)
    start, cpu = time.perf_counter(), time.process_time()
    bag = DagBag(dag_folder=str(path))
    out["files"][path.name] = {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "new_modules": sorted({m.split(".")[0] for m in set(sys.modules) - before}),
    }
    for dag in bag.dags.values():
        tasks = {}
        for t in dag.tasks:
            tasks[t.task_id] = {
                "type": type(t).__name__,
                "downstream": sorted(t.downstream_task_ids),
                "retries": t.retries,
                "backoff": t.retry_exponential_backoff,
                "teardown": t.is_teardown,
                "kernel": getattr(t, "kernel_name", None),
                "input_nb": getattr(t, "input_nb", None),
                "parameters": sorted(getattr(t, "parameters", None) or {}),
                "pre_execute": getattr(getattr(t, "_pre_execute_hook", None), "__name__", None),
                "post_execute": getattr(getattr(t, "_post_execute_hook", None), "__name__", None),
                "outlets": [getattr(o, "name", str(o)) for o in t.outlets],
                "on_failure": [getattr(c, "__name__", "") for c in t.on_failure_callback],
                "mapped_over": sorted(
                    ref.task_id
                    for ref in getattr(t, "iter_mapped_dependencies", lambda: [])()
                ),
            }
        timetable = dag.timetable
        out["dags"][dag.dag_id] = {
            "file": path.name,
            "tasks": tasks,
            "max_active_runs": dag.max_active_runs,
            "schedule": type(timetable).__name__,
            "schedule_assets": [getattr(a, "name", None) for a in
                                getattr(getattr(timetable, "asset_condition", None), "objects",
                                        [getattr(timetable, "asset_condition", None)])],
            "inner_timetable": type(getattr(timetable, "timetable", None)).__name__,
            "on_failure": getattr(dag.on_failure_callback, "__name__", None),
            "params": sorted(dag.params.keys()),
        }
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("airflow-parse")
    env = {**os.environ, **airflow_env(Settings(workdir=home, airflow_home=home))}
    # Airflow's DAG processor puts the DAG folder (the bundle's root) on sys.path; a plain
    # DagBag does not, so the parse below gets it the same way.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DAGS), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(DAGS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, f"parsing failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line.removeprefix("RESULT"))


def test_every_dag_file_imports_without_error(parsed: dict[str, Any]) -> None:
    assert parsed["files"], "no DAG file found"
    for name, info in parsed["files"].items():
        assert info["errors"] == {}, name


def test_parse_time_under_one_second(parsed: dict[str, Any]) -> None:
    """CPU time, so that a busy machine does not fail it; wall time is in the message."""
    for name, info in parsed["files"].items():
        assert info["cpu_seconds"] < 1.0, (
            f"{name} took {info['cpu_seconds']:.2f} s CPU ({info['seconds']:.2f} s wall) to parse"
        )


def test_no_heavy_imports_at_parse_time(parsed: dict[str, Any]) -> None:
    for name, info in parsed["files"].items():
        assert not set(info["new_modules"]) & set(HEAVY), (name, info["new_modules"])


def test_expected_dags(parsed: dict[str, Any]) -> None:
    assert set(parsed["dags"]) == {"dandelion_pipeline", "dandelion_retrain", "dandelion_feedback"}
    for dag in parsed["dags"].values():
        assert dag["max_active_runs"] == 1
        assert dag["on_failure"] == "on_run_failure"
        assert {"force_train", "notebook_params", "trigger"} <= set(dag["params"])


CHAIN = [
    "validate_data",
    "check_changes",
    "plan_features",
    "extract_features",
    "train",
    "evaluate",
    "promote",
    "report",
]


@pytest.mark.parametrize(
    ("dag_id", "first"),
    [("dandelion_pipeline", "ingest"), ("dandelion_retrain", "resolve_dataset")],
)
def test_task_graph(parsed: dict[str, Any], dag_id: str, first: str) -> None:
    tasks = parsed["dags"][dag_id]["tasks"]
    order = [first, *CHAIN]
    assert set(tasks) == set(order)
    for up, down in itertools.pairwise(order):
        assert tasks[up]["downstream"] == [down], (up, tasks[up]["downstream"])
    assert tasks["report"]["downstream"] == []
    assert tasks["report"]["teardown"], "report must run whatever happened upstream"
    assert tasks["check_changes"]["type"] == "ShortCircuitOperator"
    # embedding extraction: one task per shard that plan_features lists (dynamic mapping)
    assert tasks["extract_features"]["type"] == "MappedOperator"
    assert tasks["extract_features"]["mapped_over"] == ["plan_features"]


def test_notebook_steps_are_papermill_in_dandelion_kernel(parsed: dict[str, Any]) -> None:
    tasks = parsed["dags"]["dandelion_pipeline"]["tasks"]
    for task_id in NOTEBOOKS:
        task = tasks[task_id]
        assert task["type"] == "PapermillOperator", task_id
        assert task["kernel"] == "dandelion"
        assert f"notebook('{task_id}')" in task["input_nb"]
        assert task["pre_execute"] == "prepare_notebook"
        assert task["post_execute"] == "finish_notebook"


@pytest.mark.parametrize("dag_id", ["dandelion_pipeline", "dandelion_retrain"])
def test_every_parameter_the_dag_passes_is_declared_by_its_notebook(
    parsed: dict[str, Any], dag_id: str
) -> None:
    """Papermill only warns about an undeclared parameter; a typo would go unnoticed."""
    import papermill

    for task_id, task in parsed["dags"][dag_id]["tasks"].items():
        if task["type"] != "PapermillOperator":
            continue
        declared = set(papermill.inspect_notebook(ROOT / "notebooks" / NOTEBOOKS[task_id]))
        assert task["parameters"], task_id
        assert set(task["parameters"]) <= declared, (task_id, set(task["parameters"]) - declared)


def test_retries_on_io_steps_and_failure_callbacks(parsed: dict[str, Any]) -> None:
    for dag in parsed["dags"].values():
        for task_id, task in dag["tasks"].items():
            assert task["retries"] >= 1, task_id
            assert task["backoff"] > 1, task_id
            assert task["on_failure"] == ["on_task_failure"], task_id


def test_ingest_emits_the_dataset_asset_and_retraining_is_scheduled_on_it(
    parsed: dict[str, Any],
) -> None:
    assert parsed["dags"]["dandelion_pipeline"]["tasks"]["ingest"]["outlets"] == [
        "dandelion_dataset"
    ]
    retrain = parsed["dags"]["dandelion_retrain"]
    assert retrain["schedule"] == "AssetOrTimeSchedule"
    assert retrain["schedule_assets"] == ["dandelion_dataset", "dandelion_feedback"]
    assert retrain["inner_timetable"] == "CronTriggerTimetable"
    assert parsed["dags"]["dandelion_pipeline"]["schedule"] == "NullTimetable"


def test_enough_accepted_feedback_emits_the_asset_that_starts_retraining(
    parsed: dict[str, Any],
) -> None:
    watch = parsed["dags"]["dandelion_feedback"]
    assert watch["schedule"] == "CronTriggerTimetable"
    tasks = watch["tasks"]
    assert set(tasks) == {"feedback_waiting", "announce_feedback"}
    assert tasks["feedback_waiting"]["type"] == "ShortCircuitOperator"
    assert tasks["feedback_waiting"]["downstream"] == ["announce_feedback"]
    assert tasks["announce_feedback"]["outlets"] == ["dandelion_feedback"]
