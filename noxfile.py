"""Single entry point for tests, lint, the pipeline, serving and benchmarks.

Every session shares one virtual environment (``.venv``), built with uv from
``requirements.lock`` and refreshed only when the lock or ``pyproject.toml``
changes, so TensorFlow and Airflow are installed once, not per session.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent.resolve()
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".dandelion-lock.sha256"
WORKDIR = Path(os.environ.get("DANDELION_WORKDIR", ROOT / ".dandelion")).resolve()

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"


def _lock_digest() -> str:
    h = hashlib.sha256()
    for name in ("requirements.lock", "pyproject.toml"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def _env(session: nox.Session) -> dict[str, str]:
    """Create or refresh the shared venv; return the environment to run in it."""
    uv = shutil.which("uv")
    if uv is None:
        session.error("uv is required: python3 -m pip install uv nox")
    digest = _lock_digest()
    if not STAMP.exists() or STAMP.read_text().strip() != digest:
        if not (BIN / "python").exists():
            session.run(uv, "venv", "--quiet", "--python", sys.executable, str(VENV), external=True)
        env = {"VIRTUAL_ENV": str(VENV)}
        session.run(
            uv, "pip", "install", "--quiet", "-r", "requirements.lock", env=env, external=True
        )
        session.run(uv, "pip", "install", "--quiet", "--no-deps", "-e", ".", env=env, external=True)
        session.run(
            str(BIN / "python"),
            "-m",
            "ipykernel",
            "install",
            "--sys-prefix",
            "--name",
            "dandelion",
            "--display-name",
            "Python (dandelion)",
            external=True,
        )
        STAMP.write_text(digest)
    return {
        "VIRTUAL_ENV": str(VENV),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "JUPYTER_PATH": str(VENV / "share" / "jupyter"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # MLflow's usage telemetry sets and unsets an environment variable from a thread while
        # requests iterates os.environ (a KeyError race); the machines here have no egress anyway.
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    }


def _run(session: nox.Session, program: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run a program of the shared venv."""
    base = _env(session)
    base.update(env or {})
    session.run(str(BIN / program), *args, env=base, external=True)


def _exec(
    session: nox.Session, program: str, *args: str, env: dict[str, str] | None = None
) -> None:
    """Replace nox with a server of the shared venv (it runs until interrupted).

    Ctrl-C and SIGTERM then reach the server itself, which shuts down cleanly: nox kills its
    child 0.5 s after an interrupt (mid-shutdown: the API's lifespan and Voila's kernels take
    seconds) and, sent SIGTERM, exits leaving its child running. ``env`` adds defaults (the
    environment's own values win).
    """
    env = {**(env or {}), **os.environ, **_env(session)}
    argv = [str(BIN / program), *args]
    session.log(" ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


KEEP_BYTECODE = {"PYTHONDONTWRITEBYTECODE": ""}
"""The test sessions keep the bytecode (``.pyc``, git-ignored) of what they import, even where
the machine sets PYTHONDONTWRITEBYTECODE: otherwise every process a test starts (the API, the
CLI, kernels, Airflow, Voila) compiles TensorFlow, MLflow and Airflow from source again, which
takes about as long as collecting the whole suite."""


MAX_TEST_WORKERS = 4
"""``nox -s tests`` runs at most this many test processes unless told otherwise: each holds
its own servers and TensorFlow (about 2 GiB)."""


def test_workers() -> int:
    """How many processes ``nox -s tests`` runs the suite in: ``DANDELION_TEST_WORKERS``, or
    the CPUs this process may use, at most :data:`MAX_TEST_WORKERS`. 1 runs it in one process
    (``.ci/run`` does, since the slow suite runs beside it and already uses the other core)."""
    value = os.environ.get("DANDELION_TEST_WORKERS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"DANDELION_TEST_WORKERS must be a whole number >= 1, not {value!r}")
        return int(value)
    return max(1, min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS))


@nox.session
def tests(session: nox.Session) -> None:
    """Default test suite (fast and medium tests; excludes the `slow` marker), with coverage
    of dandelion_lib, api and dashboards, also in the processes the tests start.

    The floor (``fail_under`` in pyproject's ``[tool.coverage.report]``) applies to the full
    suite; a run limited by arguments (``nox -s tests -- tests/api``) only reports. The suite
    runs in :func:`test_workers` processes, a module's tests in one of them (tests/README.md,
    "Tiers"); arguments run in one process.
    """
    cov = ["--cov", "--cov-report=term:skip-covered"]
    workers: list[str] = []
    if session.posargs:
        cov.append("--cov-fail-under=0")
    elif (count := test_workers()) > 1:
        workers = ["-n", str(count), "--dist", "loadscope"]
    _run(session, "pytest", *cov, *workers, "--durations=15", *session.posargs, env=KEEP_BYTECODE)


UNIT_TESTS = (
    "tests/unit",
    "tests/app/test_view.py",
    "tests/monitoring/test_dashboards.py",
    "tests/monitoring/test_drift.py",
)
"""Where the fast tier's tests live (tests/README.md, "Tiers"): every test of tests/unit and
the tests marked ``unit`` elsewhere; naming the files spares collecting the whole suite."""


@nox.session
def unit(session: nox.Session) -> None:
    """The fast tier, in under a minute: the tests marked ``unit`` (tests/unit and other
    sub-second tests; no servers, no training). Arguments are added to pytest's
    (``nox -s unit -- -k config``)."""
    tier = ["-m", "unit and not slow and not faults", "--durations=5"]
    _run(session, "pytest", *tier, *UNIT_TESTS, *session.posargs, env=KEEP_BYTECODE)


@nox.session
def slow(session: nox.Session) -> None:
    """Slow suites: the default recipe's full training, the pipeline through Airflow (end to
    end, notebook steps, feedback trigger, StatsD), the notebooks under Papermill, browser
    tests (tests/README.md, "Tiers")."""
    _run(session, "pytest", "-m", "slow", "--durations=15", *session.posargs, env=KEEP_BYTECODE)


@nox.session
def faults(session: nox.Session) -> None:
    """The standing fault suite (docs/reliability.md): dependencies locked, stopped, hanging
    or down at start; slow and hostile clients; each asserting the answers and that nothing
    was lost, on real processes."""
    _run(session, "pytest", "-m", "faults", "--durations=15", *session.posargs, env=KEEP_BYTECODE)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check), mypy, the import-linter contracts (pyproject.toml) and the
    size and complexity limits (scripts/check_size.py)."""
    _run(session, "ruff", "check", ".")
    _run(session, "ruff", "format", "--check", ".")
    _run(session, "mypy")
    # dags/ is on sys.path under Airflow; the contracts see dandelion_tasks the same way.
    _run(session, "lint-imports", env={"PYTHONPATH": str(ROOT / "dags")})
    # Modules <= 500 lines, functions <= 60, radon complexity <= 15 in the core library, the
    # API, dags/ and dashboards/ (scripts/check_size.py's GATED).
    _run(session, "python", "scripts/check_size.py")


@nox.session
def pipeline(session: nox.Session) -> None:
    """The main job: ingest -> validate -> train -> evaluate -> promote -> report, run by
    Airflow (`airflow dags test dandelion_pipeline`) on the embedded defaults."""
    _run(session, "dandelion", "pipeline", *session.posargs)


@nox.session
def serve(session: nox.Session) -> None:
    """The prediction API on the embedded defaults (run `nox -s pipeline` first) on
    http://127.0.0.1:8000 (DANDELION_API_HOST, DANDELION_API_PORT), with the glibc malloc
    settings of the API image (docs/reliability.md, "Memory under a soak")."""
    _exec(session, "python", "-m", "api", env=api_allocator_env())


def api_allocator_env() -> dict[str, str]:
    """The glibc malloc settings (``MALLOC_*``) the API image sets (docker/api.Dockerfile):
    glibc reads them when the process starts, so a host must set them before the API runs."""
    text = (ROOT / "docker" / "api.Dockerfile").read_text()
    return dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))


@nox.session
def app(session: nox.Session) -> None:
    """The web app (Voila) on http://127.0.0.1:8866 (DANDELION_APP_PORT); it calls the API
    of `nox -s serve` (DANDELION_API_URL)."""
    _exec(session, "python", "-m", "dashboards.serve", *session.posargs)


@nox.session
def review(session: nox.Session) -> None:
    """The reviewer page (Voila) on http://127.0.0.1:8867/?token=<DANDELION_REVIEW_TOKEN>
    (DANDELION_REVIEW_PORT), on the embedded defaults' feedback database and store; it refuses
    to start without DANDELION_REVIEW_TOKEN (docs/user-guide.md, Reviewer's guide)."""
    _exec(session, "python", "-m", "dashboards.serve", "--review", *session.posargs)


@nox.session
def lab(session: nox.Session) -> None:
    """JupyterLab on notebooks/ with the `dandelion` kernel and the embedded defaults, to
    explore and retrain by hand (`nox -s pipeline` first for a dataset and a model); also as
    root. Arguments go to JupyterLab: `nox -s lab -- --port=8890`."""
    _exec(session, "python", "-m", "dashboards.lab", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: print figures and ratios against a baseline measured in the same run."""
    _run(session, "python", "-m", "benchmarks", *session.posargs)


@nox.session(venv_backend="uv", python="3.11")
def deploy_check(session: nox.Session) -> None:
    """Deployment validation: Dockerfiles, compose, Kubernetes overlays, Airflow values, workflows.

    Runs hadolint, `docker compose config` + the compose-spec schema, `kubectl kustomize`,
    kubernetes-validate, checkov, check-jsonschema and zizmor (tests/deploy). The validators get
    their own virtualenv (.nox/deploy_check) from requirements-deploy.txt: their dependencies
    conflict with the project's lock. Needs `kubectl` on PATH.
    """
    if shutil.which("kubectl") is None:
        session.error("kubectl is required (it renders the kustomize overlays)")
    session.install("-r", "requirements-deploy.txt")
    session.run(
        "pytest",
        "tests/deploy",
        "--confcutdir=tests/deploy",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=-ra --strict-markers",
        *session.posargs,
        env={"DANDELION_DEPLOY_CHECK": "1"},
    )


def _docker_problem() -> str | None:
    """None when a Docker engine answers, else why not (one line)."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return "no Docker engine reachable"
    return None


@nox.session
def images(session: nox.Session) -> None:
    """Build every image (api, app, pipeline, mlflow) offline from a wheelhouse, print sizes,
    run each read-only as compose/Kubernetes declare it, then run the pipeline image the way
    the Airflow chart does (tests/images). Without a Docker engine: one line, exit 0.
    ``-- --build-only`` builds and stops; ``-- --skip-build`` then checks what was built (CI
    builds while the slow suite still runs)."""
    problem = _docker_problem()
    if problem:
        print(f"images: SKIPPED, {problem}; nothing was built or checked")
        return
    _run(session, "python", "-m", "deploy.images", "--stand-ins", *session.posargs)
    if "--build-only" in session.posargs:
        return
    _run(
        session,
        "pytest",
        "tests/images",
        "-m",
        "docker",
        "-p",
        "no:cacheprovider",
        env={"DANDELION_IMAGE_TESTS": "1"},
    )


@nox.session
def rehearse(session: nox.Session) -> None:
    """The whole stack under docker compose (compose.yaml + deploy/rehearsal override with
    local stand-ins), one real scenario and fault steps; needs `nox -s images` first.
    Without a Docker engine: one line, exit 0."""
    problem = _docker_problem()
    if problem:
        print(f"rehearse: SKIPPED, {problem}; nothing was rehearsed")
        return
    _run(session, "python", "-m", "deploy.rehearse", *session.posargs)
