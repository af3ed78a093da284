"""Shared fixtures: the reference dataset, a real S3-protocol server, stores, MLflow server.

The S3 server is moto's standalone server (a real HTTP S3 endpoint on loopback): MinIO's
server cannot be installed on the test machines, so moto stands in for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import LocalStore, ObjectStore, S3Store
from tests.process_support import free_port, stop, wait_http

__all__ = ["free_port", "wait_http"]  # re-exported for the test modules

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
OOD_DEV = Path(os.environ.get("DANDELION_OOD_DATASET", ROOT.parent / "shared/datasets/ood-dev"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every training in the tests builds its INT8 runtime: calibrating it on 32 training photos
# instead of 100 takes ~6 s instead of ~16 s on 2 cores, over dozens of trainings. The rules
# tested (parity, the gate's tolerance, fallback) do not depend on the number.
os.environ.setdefault("DANDELION_INT8_CALIBRATION_IMAGES", "32")
# MLflow's telemetry thread sets and unsets a variable while requests iterates os.environ
# (KeyError '_MLFLOW_TELEMETRY_SESSION_ID'); tests and the processes they start run without it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Dummy credentials for the loopback S3 server only; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


UNIT = Path(__file__).resolve().parent / "unit"
REAL_BACKBONE_FIXTURES = frozenset({"lite0_trained", "lite0_predictor"})
"""Session fixtures that train the real backbone (tests/model/conftest.py): about a minute."""
REAL_BACKBONE_MODULES = (
    "tests/model/test_behaviour.py",
    "tests/model/test_evaluate.py",
    "tests/model/test_openset_model.py",
    "tests/model/test_promote.py",
    "tests/model/test_runtime.py",
    "tests/model/test_train.py",
)
"""The modules whose tests use them: with several test processes (``nox -s tests``,
``DANDELION_TEST_WORKERS``) they run in one process, so the real backbone is trained once."""
SHARED_TRAINING_SCOPE = "real-backbone"


def _module(nodeid: str) -> str:
    """The test file of a node id (``tests/x/test_y.py::test_z[p]`` -> ``tests/x/test_y.py``)."""
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of tests/unit is in the fast tier (mark ``unit``, ``nox -s unit``); a test
    elsewhere joins it with ``@pytest.mark.unit`` (tests/README.md, "Tiers"). A test that
    uses the real backbone's training outside :data:`REAL_BACKBONE_MODULES` is an error:
    with several processes it would train it a second time."""
    for item in items:
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.unit)
        uses = REAL_BACKBONE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        module = _module(item.nodeid)
        if uses and module not in REAL_BACKBONE_MODULES:
            raise pytest.UsageError(
                f"{module} uses {', '.join(sorted(uses))}: add it to REAL_BACKBONE_MODULES "
                "in tests/conftest.py"
            )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With several test processes (``-n``, ``--dist loadscope``, as ``nox -s tests`` runs
    them): each module's tests run in one process (its module fixtures set up once), and
    the modules of :data:`REAL_BACKBONE_MODULES` all in the same one."""
    if config.getoption("dist", None) != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedTrainingScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if _module(nodeid) in REAL_BACKBONE_MODULES:
                return SHARED_TRAINING_SCOPE
            return str(super()._split_scope(nodeid))

    return SharedTrainingScheduling(config, log)


@pytest.fixture(scope="session")
def greenr_dir() -> Path:
    """The reference dataset: <label>/<8-digit index>.jpg, 200 per label."""
    if not (GREENR / "dandelion").is_dir():
        pytest.fail(f"reference dataset not found at {GREENR} (set DANDELION_TEST_DATASET)")
    return GREENR


@pytest.fixture(scope="session")
def ood_dir() -> Path:
    """Photos that are neither class: <kind>/<name>.jpg (objects, daisy, sunflowers...)."""
    if not (OOD_DEV / "objects").is_dir():
        pytest.fail(f"ood-dev dataset not found at {OOD_DEV} (set DANDELION_OOD_DATASET)")
    return OOD_DEV


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-protocol server (moto) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same tests run against both backends."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "prefix", endpoint_url=endpoint)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded-default settings rooted in a temporary work dir."""
    return Settings(workdir=tmp_path / "work")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[str]:
    """A real MLflow tracking server (1 worker, SQLite backend, artifacts on loopback S3)."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    workdir = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        # The server's background job workers (GenAI jobs) are not used by dandelion.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{bucket}/artifacts",
            "--expose-prometheus",  # /metrics, as the deployed server runs
            str(workdir / "prometheus"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120, proc=proc)
        yield url
    finally:
        stop(proc)
        log.close()
