"""The embedded-Airflow runner: :func:`run_pipeline` runs a DAG with ``airflow dags test``
(the command ``dandelion pipeline``, :mod:`dandelion_lib.cli.pipeline`).

Its one job is running the DAGs on one machine: Airflow's environment and SQLite DB under the
work directory, the Jupyter kernel the notebooks need (:func:`check_kernel`), the
``airflow dags test`` subprocess, and printing the run summary. The steps themselves live in
their own modules (:mod:`~dandelion_lib.data.datagate`, :mod:`~dandelion_lib.lifecycle.changes`,
:mod:`~dandelion_lib.summary`, the stages) and are wired by ``dags/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.data.sources import absolute_source_specs
from dandelion_lib.summary import format_summary, read_summary


class KernelMissingError(DandelionError):
    """The Jupyter kernel the notebooks need is not registered (or its Python is gone)."""


class PipelineError(DandelionError):
    """The pipeline run failed; the message names the failed step."""


def kernel_hint(name: str) -> str:
    return (
        f"register it with: {sys.executable} -m ipykernel install --sys-prefix --name {name} "
        "(any nox session does this when it creates .venv)"
    )


def check_kernel(name: str) -> Path:
    """Path of the kernel spec ``name`` (the ``kernel_name`` setting); raise
    :class:`KernelMissingError`."""
    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name)
    except NoSuchKernel:
        raise KernelMissingError(
            f"Jupyter kernel {name!r} is not registered; {kernel_hint(name)}"
        ) from None
    program = spec.argv[0] if spec.argv else ""
    if program and os.sep in program and not Path(program).exists():
        raise KernelMissingError(
            f"Jupyter kernel {name!r} points to a missing Python ({program}); {kernel_hint(name)}"
        )
    return Path(spec.resource_dir)


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment of the embedded Airflow: SQLite DB under the work dir, our DAGs only."""
    home = settings.resolved_airflow_home
    dags = Path(__file__).resolve().parents[1] / "dags"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        # The DAG file imports in seconds; on a busy machine the 30 s default was hit.
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "DANDELION_WORKDIR": str(settings.workdir_path),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
    }


def task_env(settings: Settings, source: str | None = None) -> dict[str, str]:
    """:func:`airflow_env` plus the settings the tasks need when they run in the work dir.

    The tasks run with the work directory as their current directory (so that nothing a
    library writes relative to it lands in the checkout); the ``DANDELION_*`` values of a
    ``.env`` file here are passed on, and relative paths are made absolute.
    """
    env = airflow_env(settings)
    if Path(".env").is_file():
        for key, value in dotenv_values(".env").items():
            if key.upper().startswith("DANDELION_") and value is not None:
                env.setdefault(key.upper(), os.environ.get(key, value))
    # local folders made absolute, each source keeping its name
    env["DANDELION_SOURCE"] = absolute_source_specs(source or settings.ingest.source)
    negatives = settings.ingest.negatives_source
    if negatives:  # a local folder made absolute; a URL (file://, s3://) as it is
        env["DANDELION_NEGATIVES_SOURCE"] = (
            negatives if "://" in negatives else str(Path(negatives).expanduser().resolve())
        )
    if settings.orchestration.notebooks_dir is not None:
        env["DANDELION_NOTEBOOKS_DIR"] = str(settings.resolved_notebooks_dir)
    if settings.orchestration.airflow_home is not None:
        env["DANDELION_AIRFLOW_HOME"] = str(settings.resolved_airflow_home)
    store = settings.resolved_store_url
    if "://" not in store:  # a plain local path
        store = Path(store).expanduser().resolve().as_uri()
    env["DANDELION_STORE_URL"] = store
    return env


def _airflow_exe() -> str:
    exe = Path(sys.executable).parent / "airflow"
    if not exe.exists():
        raise PipelineError(
            "Airflow is not installed in this environment; install the 'pipeline' extra "
            "(nox does: nox -s pipeline)"
        )
    return str(exe)


def ensure_airflow_db(env: dict[str, str]) -> bool:
    """Migrate Airflow's SQLite DB once per Airflow release; True when it ran."""
    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".db-migrated"
    release = version("apache-airflow")
    if stamp.exists() and stamp.read_text().strip() == release and (home / "airflow.db").exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_airflow_exe(), "db", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:] + proc.stderr.splitlines()[-20:])
        raise PipelineError(f"airflow db migrate failed:\n{tail}")
    stamp.write_text(release)
    return True


_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+)")
_RETRY = re.compile(r"new_state=up_for_retry")


def run_dag(
    dag_id: str,
    conf: dict[str, Any],
    env: dict[str, str],
    *,
    log_path: Path,
    verbose: bool = False,
    cwd: Path | None = None,
) -> int:
    """``airflow dags test <dag_id>``; streams progress, keeps the full log; returns its status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    cmd = [_airflow_exe(), "dags", "test", dag_id, "-c", json.dumps(conf)]
    with log_path.open("w") as log:
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if verbose:
                print(line, end="", flush=True)
                continue
            if m := _TASK_START.search(line):
                print(f"[{time.monotonic() - start:6.1f}s] {m.group(1)}", flush=True)
            elif _RETRY.search(line):
                print(f"[{time.monotonic() - start:6.1f}s]   failed, retry scheduled", flush=True)
        return proc.wait()


def run_pipeline(
    settings: Settings,
    dag: str,
    *,
    force_train: bool = False,
    source: str | None = None,
    verbose: bool = False,
) -> int:
    """Run ``dag`` with ``airflow dags test`` on the embedded defaults and print its summary;
    returns the exit status (1 when the run failed or wrote no summary)."""
    check_kernel(settings.orchestration.kernel_name)
    env = task_env(settings, source=source)
    home = Path(env["AIRFLOW_HOME"])
    if ensure_airflow_db(env):
        print(f"Airflow DB migrated under {home}", flush=True)
    trigger = uuid.uuid4().hex
    conf = {"force_train": force_train, "trigger": trigger}
    log_path = home / "logs" / "dags-test" / f"{time.strftime('%Y%m%dT%H%M%S')}-{dag}.log"
    print(f"airflow dags test {dag}  (log: {log_path})", flush=True)
    start = time.monotonic()
    rc = run_dag(dag, conf, env, log_path=log_path, verbose=verbose, cwd=settings.workdir_path)
    elapsed = time.monotonic() - start
    summary = read_summary(settings, trigger)
    print()
    if summary is None:
        print(f"No run summary was written; read the log: {log_path}", file=sys.stderr)
        return rc or 1
    print(format_summary(summary))
    print(f"  {'log':<10} {log_path}\n  {'time':<10} {elapsed:.0f} s")
    if rc == 0 and summary.get("status") == "failed":
        rc = 1
    return rc
