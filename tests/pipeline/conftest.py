"""Fixtures of the pipeline tests: an embedded Airflow home and the reference images on HTTP."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.pipeline import airflow_env

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).parent / "airflow"


@pytest.fixture(scope="session")
def airflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow SQLite DB migrated once per session (copied into each test's home)."""
    home = tmp_path_factory.mktemp("airflow-template")
    env = {**os.environ, **airflow_env(Settings(workdir=home, airflow_home=home))}
    subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300
    )
    return home / "airflow.db"


def make_pipeline_env(root: Path, airflow_db: Path) -> dict[str, str]:
    """Environment of an embedded Airflow + dandelion work dir, both under ``root``."""
    work = root / "work"
    home = work / "airflow"
    home.mkdir(parents=True)
    shutil.copy(airflow_db, home / "airflow.db")
    (home / ".db-migrated").write_text(version("apache-airflow"))  # as `dandelion pipeline` does
    env = {
        **os.environ,
        **airflow_env(Settings(workdir=work)),
        "DANDELION_WORKDIR": str(work),
        "DANDELION_PIPELINE_RETRY_DELAY_S": "1",
        "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"),
        # The project (tests import it) and dags/ (test DAGs import dandelion_tasks).
        "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "dags"))),
    }
    for key in ("DANDELION_STORE_URL", "DANDELION_TRACKING_URI", "DANDELION_SOURCE"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def pipeline_env_factory(airflow_db: Path) -> Callable[[Path], dict[str, str]]:
    """``factory(root)``: a fresh embedded Airflow + work dir under ``root``."""
    return functools.partial(make_pipeline_env, airflow_db=airflow_db)


@pytest.fixture
def pipeline_env(tmp_path: Path, airflow_db: Path) -> dict[str, str]:
    """A fresh embedded Airflow + dandelion work dir under ``tmp_path``."""
    return make_pipeline_env(tmp_path, airflow_db)


def dags_test(
    dag_id: str,
    env: dict[str, str],
    conf: dict | None = None,
    *,
    cwd: Path,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run ``airflow dags test`` for real; the log is kept next to the work dir."""
    cmd = [str(AIRFLOW), "dags", "test", dag_id, "-c", json.dumps(conf or {})]
    proc = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    (cwd / f"dags-test-{dag_id}.log").write_text(proc.stdout + proc.stderr)
    return proc


@pytest.fixture
def run_dag() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_dag(dag_id, env, conf=None, cwd=...)``: ``airflow dags test`` for real."""
    return dags_test


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(path: Path, *, drop_first: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve a folder on loopback HTTP; returns (base URL, stop).

    ``drop_first=N`` closes the connection without an answer on the first N requests: an
    outage of the source that ends by itself.
    """
    state = {"left": drop_first}
    lock = threading.Lock()

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            with lock:
                dropping = state["left"] > 0
                state["left"] -= 1
            if dropping:
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop
