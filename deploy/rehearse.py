"""`nox -s rehearse`: the whole stack under docker compose, one real scenario through the
containers only, then fault steps. Prints a summary with timings; exits non-zero on any failed
step; removes its containers, networks and volumes.

compose.yaml + deploy/rehearsal/compose.rehearsal.yaml (local stand-ins for the third-party
images, random loopback ports). The project images are those `nox -s images` built.

Scenario: stack up (health-gated) -> the pipeline DAG runs in the Airflow containers
(scheduler + dag-processor + api-server, LocalExecutor) against PostgreSQL-backed MLflow with S3
(moto) artifacts -> champion registered -> API ready, predicts real photos -> the app page in
Chromium classifies an upload and records feedback -> the feedback row is in PostgreSQL ->
Prometheus scrapes every target. Faults: API restart, scheduler killed mid-task, PostgreSQL outage (the scheduler must
heartbeat again; a stale heartbeat is diagnosed), scheduler frozen (its health probe restarts
it). Then the feedback loop through the containers into retraining (deploy/rehearse_loop.py).
Last, a backup of the databases and buckets restored into fresh storage, where MLflow finds the
champion and the datasets and feedback rows are all there (deploy/rehearse_restore.py).

    python -m deploy.rehearse [--keep] [--per-class N]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy import dockerkit as dk
from deploy.dockerkit import ROOT, StepFailed

PROJECT = "dandelion-rehearsal"
OVERRIDE = ROOT / "deploy" / "rehearsal" / "compose.rehearsal.yaml"
DATASET = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
DAG = "dandelion_pipeline"
LABELS = ("dandelion", "grass")
CHROMIUM = os.environ.get("DANDELION_CHROMIUM", "/usr/bin/chromium")


@dataclass
class Step:
    name: str
    seconds: float
    ok: bool
    detail: str


@dataclass
class Rehearsal:
    env: dict[str, str]
    workdir: Path
    per_class: int
    steps: list[Step] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    project: str = PROJECT  # the compose project (the restore step starts a second one)

    # --- compose -------------------------------------------------------------------------------
    def compose(
        self, *args: str, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose", "-p", self.project, "-f", str(ROOT / "compose.yaml")]
        cmd += ["-f", str(OVERRIDE), *args]
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if args and args[0] in ("up", "start", "restart", "kill", "stop"):
            self.ports.clear()  # a container (re)started gets new random host ports
        if check and proc.returncode != 0:
            raise StepFailed(
                f"docker compose {' '.join(args[:4])} exited {proc.returncode}\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}"
            )
        return proc

    def exec(self, service: str, *cmd: str, timeout: float = 300) -> str:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout).stdout

    def port(self, service: str, container_port: int) -> int:
        key = f"{service}:{container_port}"
        if key not in self.ports:
            out = self.compose("port", service, str(container_port)).stdout.strip()
            self.ports[key] = int(out.rsplit(":", 1)[1])
        return self.ports[key]

    def url(self, service: str, container_port: int, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port(service, container_port)}{path}"

    # --- steps ---------------------------------------------------------------------------------
    def step(self, name: str, action: Callable[[], str]) -> None:
        print(f"--> {name}", flush=True)
        start = time.monotonic()
        try:
            detail = action()
            ok = True
        except (
            StepFailed, AssertionError, subprocess.SubprocessError, OSError, ValueError, KeyError
        ) as exc:  # fmt: skip
            detail, ok = f"{type(exc).__name__}: {exc}"[-3000:], False
        took = time.monotonic() - start
        self.steps.append(Step(name, took, ok, detail))
        print(f"    {'ok' if ok else 'FAILED'} in {took:.0f} s: {detail}", flush=True)
        if not ok:
            raise StepFailed(name)

    def summary(self) -> str:
        lines = ["rehearsal summary:"]
        for s in self.steps:
            first = s.detail.splitlines()[0] if s.detail else ""
            lines.append(f"  {'PASS' if s.ok else 'FAIL'} {s.seconds:7.0f} s  {s.name}: {first}")
        total = sum(s.seconds for s in self.steps)
        passed = sum(s.ok for s in self.steps)
        lines.append(f"  {passed} passed, {len(self.steps) - passed} failed ({total:.0f} s)")
        return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------------------
def _http(
    method: str, url: str, body: bytes | None = None, ctype: str = "", timeout: float = 60
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), int(exc.code)
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def _photos(per_label: int) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for label in LABELS:
        # The last photos in source order: the small training config takes the first ones.
        out += [(label, p) for p in sorted((DATASET / label).glob("*.jpg"))[-per_label:]]
    return out


def _wait(what: str, check: Callable[[], bool], timeout_s: float, every: float = 2.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():
            return time.monotonic() - start
        time.sleep(every)
    raise StepFailed(f"{what}: not within {timeout_s:.0f} s")


def _secrets_env(workdir: Path) -> dict[str, str]:
    def tok() -> str:
        return secrets.token_hex(16)

    return {
        **os.environ,
        "COMPOSE_PROJECT_NAME": PROJECT,
        "POSTGRES_PASSWORD": tok(),
        "MLFLOW_DB_PASSWORD": tok(),
        "AIRFLOW_DB_PASSWORD": tok(),
        "FEEDBACK_DB_PASSWORD": tok(),
        "MINIO_ROOT_USER": "rehearsal-root",
        "MINIO_ROOT_PASSWORD": tok(),
        "S3_ACCESS_KEY_ID": "rehearsal",
        "S3_SECRET_ACCESS_KEY": tok(),
        "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW_API_SECRET_KEY": tok(),
        "AIRFLOW_JWT_SECRET": tok(),
        "API_ADMIN_TOKEN": tok(),
        "REVIEW_TOKEN": tok(),  # compose.yaml requires it (the `review` profile is off)
        "GRAFANA_ADMIN_PASSWORD": tok(),
        "REHEARSAL_DIR": str(workdir),
        "REHEARSAL_DATASET": str(DATASET),
    }


def _prometheus_config(workdir: Path) -> None:
    """monitoring/prometheus.yml without the grafana job (no stand-in), rules by absolute path."""
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] != "grafana"]
    config["rule_files"] = [f"/etc/dandelion/monitoring/{f}" for f in config.get("rule_files", [])]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "prometheus.yml").chmod(0o644)


# --- the scenario --------------------------------------------------------------------------------
def stack_up(r: Rehearsal) -> str:
    missing = [
        t
        for t in [*map(dk.image_tag, dk.PROJECT_IMAGES), dk.STAND_INS_IMAGE]
        if not dk.image_exists(t)
    ]
    if missing:
        raise StepFailed(f"images missing (run `nox -s images` first): {missing}")
    r.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "900", timeout=1000)
    states = r.compose("ps", "--format", "{{.Service}}={{.Health}}").stdout.split()
    return "healthy: " + ", ".join(sorted(states))


def _airflow(r: Rehearsal, *args: str, timeout: float = 300) -> str:
    return r.exec("airflow-scheduler", "airflow", *args, timeout=timeout)


def _json_out(text: str) -> Any:
    """The JSON document of an Airflow CLI output (it may print warnings before it)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line[:1] in ("[", "{")), 0)
    return json.loads("\n".join(lines[first:]))


def _run_state(r: Rehearsal, run_id: str) -> tuple[str, dict[str, str]]:
    """The run's state and its tasks' states, as the Airflow CLI reports them."""
    runs = _json_out(_airflow(r, "dags", "list-runs", DAG, "-o", "json"))
    state = next((x["state"] for x in runs if x["run_id"] == run_id), "missing")
    tasks = _json_out(_airflow(r, "tasks", "states-for-dag-run", DAG, run_id, "-o", "json"))
    return state, {t["task_id"]: str(t["state"]) for t in tasks}


def psql(r: Rehearsal, db: str, query: str) -> list[list[str]]:
    """Rows of a query on database ``db`` (psql in the postgres container), fields split."""
    out = r.exec("postgres", "psql", "-U", "postgres", "-d", db, "-tAF", "|", "-c", query)
    return [line.split("|") for line in out.splitlines() if line]


def _airflow_db(r: Rehearsal, query: str) -> list[list[str]]:
    """Rows of a query on the Airflow metadata database."""
    return psql(r, "airflow", query)


def _safe(run_id: str) -> str:
    assert run_id.replace("-", "").isalnum(), run_id  # ours (trigger()): safe in a literal
    return run_id


def _db_state(r: Rehearsal, run_id: str) -> tuple[str, dict[str, str]]:
    """Like _run_state, read from the metadata database: a poll costs milliseconds, not the
    seconds of CPU of an Airflow CLI start (which would slow the run it watches)."""
    where = f"dag_id = '{DAG}' and run_id = '{_safe(run_id)}'"
    rows = _airflow_db(
        r,
        f"select '', state from dag_run where {where} union all "
        f"select task_id, coalesce(state, '') from task_instance where {where}",
    )
    state = next((s for t, s in rows if not t), "missing")
    return state, {t: s for t, s in rows if t}


def _tries(r: Rehearsal, run_id: str) -> dict[str, int]:
    """Each task's try number in the run."""
    rows = _airflow_db(
        r, f"select task_id, try_number from task_instance where run_id = '{_safe(run_id)}'"
    )
    return {task: int(n) for task, n in rows}


def _scheduler_heartbeat_age(r: Rehearsal) -> float | None:
    """Seconds since the freshest heartbeat of a running scheduler job (None: no such job)."""
    rows = _airflow_db(
        r,
        "select extract(epoch from now() - max(latest_heartbeat)) from job "
        "where job_type = 'SchedulerJob' and state = 'running'",
    )
    value = rows[0][0] if rows and rows[0] else ""
    return float(value) if value else None


def _airflow_diagnosis(r: Rehearsal) -> str:
    """What a failed wait on a run appends: the live Airflow jobs, the Airflow logs' tails."""
    jobs = _airflow_db(
        r,
        "select job_type, hostname, round(extract(epoch from now() - latest_heartbeat)) "
        "from job where state = 'running' order by id",
    )
    logs = r.compose(
        "logs", "--tail", "40", "airflow-scheduler", "airflow-apiserver", check=False
    ).stdout
    return f"running jobs (type, host, heartbeat age s): {jobs}\n{logs[-4000:]}"


def trigger(r: Rehearsal, tag: str, force: bool) -> str:
    conf = {
        "trigger": tag,
        "force_train": force,
        # Small training config (the test suite's tiny model): minutes, not an hour, on 2 cores.
        "notebook_params": {
            "train": {"max_images_per_class": r.per_class, "augment_copies": 1, "seed": 7}
        },
    }
    run_id = f"rehearsal-{tag}-{int(time.time())}"
    _airflow(r, "dags", "trigger", DAG, "--run-id", run_id, "--conf", json.dumps(conf))
    return run_id


def wait_run(r: Rehearsal, run_id: str, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    state, tasks = "queued", dict[str, str]()
    while time.monotonic() < deadline:
        state, tasks = _db_state(r, run_id)
        if state in ("success", "failed"):
            break
        time.sleep(5)
    if state == "success":
        state, tasks = _run_state(r, run_id)  # the end state as the Airflow CLI reports it
    if state != "success":
        raise StepFailed(f"run {run_id} ended {state}: {tasks}; {_airflow_diagnosis(r)}")
    return tasks


def pipeline_run(r: Rehearsal) -> str:
    _wait(
        "DAG parsed by the dag-processor",
        lambda: DAG in _airflow(r, "dags", "list", "-o", "plain"),
        300,
        every=5,
    )
    _airflow(r, "dags", "unpause", DAG)
    run_id = trigger(r, "first", force=True)
    tasks = wait_run(r, run_id, 3600)
    return f"{run_id}: {tasks}"


def champion(r: Rehearsal) -> str:
    url = r.url(
        "mlflow", 5000, "/api/2.0/mlflow/registered-models/alias?name=dandelion&alias=champion"
    )
    status, body = _http("GET", url)
    assert status == 200, f"no champion: {status} {body}"
    version = body["model_version"]
    return f"dandelion v{version['version']} (run {version.get('run_id', '?')[:8]}, source {version.get('source', '')[:40]})"


def api_predicts(r: Rehearsal) -> str:
    _wait(
        "API /health/ready", lambda: dk.http_status(r.url("api", 8000, "/health/ready")) == 200, 300
    )
    photos = _photos(10)
    right = 0
    for label, path in photos:
        status, body = _http(
            "POST", r.url("api", 8000, "/predict"), path.read_bytes(), "image/jpeg"
        )
        assert status == 200, f"{path.name}: {status} {body}"
        right += body["label"] == label
    accuracy = right / len(photos)
    assert accuracy >= 0.7, f"only {right}/{len(photos)} photos right"
    return f"{right}/{len(photos)} held-out reference photos classified right"


def app_in_browser(r: Rehearsal) -> str:
    from playwright.sync_api import sync_playwright

    label, photo = _photos(1)[0]
    upload = r.workdir / f"upload-{photo.name}"
    upload.write_bytes(photo.read_bytes())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(r.url("app", 8866, "/"), wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".dl-app", timeout=120_000)
            with page.expect_file_chooser() as chooser:
                page.locator(".dl-upload").click()
            chooser.value.set_files([str(upload)])
            page.wait_for_selector(".dl-card", timeout=120_000)
            card = page.locator(".dl-card").first.inner_text()
            assert upload.name in card and "confidence" in card, card
            page.locator(f".dl-feedback-{label}").first.click()
            page.locator(".dl-feedback-ok").first.wait_for(timeout=60_000)
            page.screenshot(path=str(r.workdir / "app.png"), full_page=True)
        finally:
            browser.close()
    return f"page rendered, {photo.name} classified: {card.splitlines()[1:3]}; feedback clicked"


def _feedback_rows(r: Rehearsal) -> int:
    return int(psql(r, "feedback", "select count(*) from feedback")[0][0])


def feedback_in_postgres(r: Rehearsal) -> str:
    rows = _feedback_rows(r)
    assert rows >= 1, "no feedback row in PostgreSQL"
    return f"{rows} feedback row(s) in PostgreSQL (database feedback)"


def prometheus_targets(r: Rehearsal) -> str:
    url = r.url("prometheus", 9090, "/api/v1/targets")
    last: list[tuple[str, str]] = []

    def all_up() -> bool:
        nonlocal last
        status, body = _http("GET", url)
        if status != 200:
            return False
        active = body["data"]["activeTargets"]
        last = [(t["labels"]["job"], t["health"]) for t in active]
        jobs = {job for job, _ in last}
        return {"api", "mlflow"} <= jobs and all(h == "up" for _, h in last)

    try:
        _wait("every Prometheus target up", all_up, 120, every=5)
    except StepFailed as exc:
        raise StepFailed(f"{exc}: {last}") from None
    return "up: " + ", ".join(sorted(job for job, _ in last))


def _predict_one(r: Rehearsal) -> dict[str, Any]:
    _, photo = _photos(1)[0]
    status, body = _http("POST", r.url("api", 8000, "/predict"), photo.read_bytes(), "image/jpeg")
    assert status == 200, f"predict: {status} {body}"
    assert isinstance(body, dict)
    return body


def _feedback(r: Rehearsal, prediction_id: str) -> tuple[int, Any]:
    payload = json.dumps({"prediction_id": prediction_id, "correct_label": "dandelion"}).encode()
    return _http("POST", r.url("api", 8000, "/feedback"), payload, "application/json")


def fault_api_restart(r: Rehearsal) -> str:
    before = _feedback_rows(r)
    r.compose("restart", "api")
    took = _wait(
        "API ready again", lambda: dk.http_status(r.url("api", 8000, "/health/ready")) == 200, 300
    )
    _predict_one(r)
    after = _feedback_rows(r)
    assert after == before, f"feedback rows {before} -> {after}"
    return f"ready again {took:.0f} s after the restart; {after} feedback rows kept"


def _restarts(r: Rehearsal) -> dict[str, int]:
    """How often Docker restarted each running service's container (its restart policy)."""
    ids = r.compose("ps", "-q").stdout.split()
    fmt = '{{index .Config.Labels "com.docker.compose.service"}}={{.RestartCount}}'
    out = dk.docker("inspect", "--format", fmt, *ids).stdout if ids else ""
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.split())}


def _all_healthy(r: Rehearsal) -> bool:
    """Every running service healthy (each one declares a health check)."""
    states = r.compose("ps", "--format", "{{.Service}}={{.Health}}").stdout.split()
    return bool(states) and all(s.endswith("=healthy") for s in states)


def fault_postgres_outage(r: Rehearsal) -> str:
    restarts = _restarts(r)
    r.compose("stop", "postgres")
    down = time.monotonic()
    try:
        pred = _predict_one(r)
        status, body = _feedback(r, pred["prediction_id"])
        assert status == 503, f"feedback during the outage: {status} {body}"
        time.sleep(15)
        _predict_one(r)  # still predicting after a while
    finally:
        r.compose("start", "postgres")
    outage = time.monotonic() - down
    r.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "300", "postgres", timeout=400)

    def recovered() -> bool:
        pred = _predict_one(r)
        status, _ = _feedback(r, pred["prediction_id"])
        return status in (200, 201)

    took = _wait("feedback accepted again", recovered, 180, every=3)
    # Components that exit without their database come back under their restart policy.
    healthy = _wait("every service healthy again", lambda: _all_healthy(r), 600, every=5)
    from deploy.rehearse_heal import scheduler_heals  # it imports this module's helpers

    heartbeat = scheduler_heals(r)
    restarted = sorted(k for k, n in _restarts(r).items() if n > restarts.get(k, 0))
    return (
        f"PostgreSQL down {outage:.0f} s: feedback 503, predictions 200; feedback accepted "
        f"{took:.0f} s after it was back, every service healthy after {took + healthy:.0f} s "
        f"(restarted by their restart policy: {', '.join(restarted) or 'none'}); {heartbeat}"
    )


# The scheduler resets the tasks of a scheduler job whose heartbeat is older than this (Airflow's
# [scheduler] scheduler_health_check_threshold, default 30 s); a restart within it would wait
# for the next orphan check (orphaned_tasks_check_interval, 5 minutes).
SCHEDULER_DEAD_AFTER_S = 35
# A live scheduler heartbeats every 5 s ([scheduler] scheduler_heartbeat_sec).
SCHEDULER_LIVE_S = 15


def fault_scheduler_kill(r: Rehearsal) -> str:
    # Unchanged data: ingest (a notebook task, about a minute) runs, check_changes then skips
    # training, so the step costs minutes, not a second training.
    # A scheduler that is alive, not only a container marked healthy: its health check runs once
    # a minute, so a wedged scheduler would still show "healthy".
    def live() -> bool:
        age = _scheduler_heartbeat_age(r)
        return age is not None and age < SCHEDULER_LIVE_S

    _wait(f"a scheduler heartbeat under {SCHEDULER_LIVE_S} s old", live, 300, 3)
    run_id = trigger(r, "scheduler-kill", force=False)
    victim = "ingest"
    try:
        _wait(f"{victim} running", lambda: _db_state(r, run_id)[1].get(victim) == "running", 300, 1)
    except StepFailed as exc:
        state, tasks = _db_state(r, run_id)
        raise StepFailed(f"{exc}; run {run_id} {state}: {tasks}; {_airflow_diagnosis(r)}") from None
    before = _tries(r, run_id)[victim]
    # SIGKILL: the scheduler and the LocalExecutor's task processes die with the container.
    r.compose("kill", "-s", "SIGKILL", "airflow-scheduler")
    time.sleep(SCHEDULER_DEAD_AFTER_S)
    r.compose("up", "-d", "--no-build", "airflow-scheduler")
    tasks = wait_run(r, run_id, 1800)
    after = _tries(r, run_id)[victim]
    assert after > before, f"{victim} was not run again: try {before} -> {after}"
    assert tasks[victim] == "success", tasks
    return (
        f"scheduler killed while {victim} ran (try {before}); the restarted scheduler reset it "
        f"and ran it again (try {after}); run {run_id} succeeded: {tasks}"
    )


@contextmanager
def rehearsal(per_class: int, keep: bool) -> Iterator[Rehearsal]:
    workdir = Path(tempfile.mkdtemp(prefix="dandelion-rehearsal-"))
    workdir.chmod(0o755)
    _prometheus_config(workdir)
    r = Rehearsal(_secrets_env(workdir), workdir, per_class)
    r.compose("down", "-v", "--remove-orphans", check=False)
    try:
        yield r
    finally:
        if not keep:
            r.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rehearse the compose stack end to end.")
    parser.add_argument("--keep", action="store_true", help="leave the stack up afterwards")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--no-faults", action="store_true", help="skip the fault steps")
    opts = parser.parse_args(argv)
    problem = dk.engine_problem()
    if problem:
        print(f"rehearse: SKIPPED, {problem}; nothing was rehearsed")
        return 0
    # They import this module's helpers.
    from deploy.rehearse_heal import fault_scheduler_frozen
    from deploy.rehearse_loop import feedback_loop
    from deploy.rehearse_restore import backup_restored

    failed = False
    with rehearsal(opts.per_class, opts.keep) as r:
        steps: list[tuple[str, Callable[[Rehearsal], str]]] = [
            ("stack up (health-gated)", stack_up),
            ("pipeline DAG run in Airflow", pipeline_run),
            ("champion registered in MLflow", champion),
            ("API ready, predicts real photos", api_predicts),
            ("app in Chromium: upload, classify, feedback", app_in_browser),
            ("feedback row in PostgreSQL", feedback_in_postgres),
            ("Prometheus: every target up", prometheus_targets),
        ]
        if not opts.no_faults:
            # The scheduler is killed before the PostgreSQL outage: after an outage the scheduler
            # has been seen to stop heartbeating without exiting (docs/deployment.md); the outage
            # step requires a fresh heartbeat again (compose's health probe restarts a stale
            # scheduler) and diagnoses a stale one (deploy/rehearse_heal.py). The freeze comes
            # first, while the scheduler container is older than its probe's grace (180 s): the
            # probe then heals it as soon as it can, not 180 s after the last restart.
            steps += [
                ("fault: API container restart", fault_api_restart),
                ("fault: scheduler frozen, healed by its health probe", fault_scheduler_frozen),
                ("fault: scheduler killed mid-task", fault_scheduler_kill),
                ("fault: PostgreSQL outage", fault_postgres_outage),
            ]
        # After the faults: it leaves dandelion_retrain paused, its run stopped before training.
        steps.append(("feedback loop: accepted photos in the next dataset version", feedback_loop))
        # After the loop: the backup then holds its feedback rows, images and dataset version.
        steps.append(("backup restored into a fresh stack", backup_restored))

        try:
            for name, action in steps:
                r.step(name, lambda a=action: a(r))  # type: ignore[misc]
        except StepFailed:
            failed = True
            print(r.compose("ps", "-a", check=False).stdout)
        print(r.summary())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
