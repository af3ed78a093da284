"""The feedback loop inside the compose stack, a step of `nox -s rehearse` (deploy/rehearse.py):
photos sent as feedback to the API container with their images -> accepted with the `dandelion`
CLI in the scheduler container -> the `dandelion_feedback` DAG announces them (the feedback
asset event) -> the event starts `dandelion_retrain`, whose new dataset version
(`resolve_dataset`) contains them.

Both DAGs stay paused until the step (Airflow queues no asset event for a paused DAG). Unpaused,
each queues a run for its latest cron slot at once (catchup is off): `dandelion_retrain`'s is
stopped before the photos are accepted, `dandelion_feedback`'s, after, is the one that must
announce them. The retrain run checked is any run queued after the photos were accepted (the
asset-triggered one; its run type and its triggering DAGs are reported).

Through the containers only: the API's HTTP port, `docker compose exec` of the CLI, Airflow's
CLI and REST API, and the stores as the library in the pipeline image reads them. Once its
dataset version is checked, both DAGs are paused and the retrain run is marked failed through
the REST API, which skips its remaining steps: training on the default recipe would take most
of an hour on 2 cores; the slow suite's tests/pipeline/test_feedback_loop.py follows a
retraining to its gated model.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from deploy import rehearse as rh
from deploy.dockerkit import StepFailed

FEEDBACK_DAG = "dandelion_feedback"
RETRAIN_DAG = "dandelion_retrain"
# DANDELION_RETRAIN_FEEDBACK_THRESHOLD of the scheduler in compose.rehearsal.yaml.
THRESHOLD = 4
SAFE = re.compile(r"[\w:+.\-]+")  # DAG ids and run ids (ours, Airflow's asset-triggered ones)
# A run's or a task's states that end it; a task's states while it is still to run or runs.
ENDED = ("success", "failed", "skipped", "upstream_failed", "removed")
ACTIVE = {"scheduled", "queued", "running", "up_for_retry", "restarting", "deferred"}
TEARDOWN = "report"  # the DAGs' teardown task (dags/dandelion.py)
PASSWORDS = "/opt/airflow/simple_auth_manager_passwords.json.generated"
# Where the library reads a dataset version's rows: printed as JSON, the feedback sources.
MANIFEST_SOURCES = (
    "import json, sys; "
    "from dandelion_lib.core.config import get_settings; "
    "from dandelion_lib.core.storage import open_store; "
    "from dandelion_lib.data import dataset; "
    "df = dataset.load_manifest(open_store(get_settings()), sys.argv[1]); "
    "print(json.dumps({'rows': len(df), 'sources': sorted(set(map(str, df['source'])))}))"
)


def _new_photos() -> list[tuple[str, bytes]]:
    """Photos no dataset version holds yet: held-out reference photos mirrored (new bytes,
    the same class), half of each label."""
    from PIL import Image, ImageOps

    out: list[tuple[str, bytes]] = []
    for label, path in rh._photos(THRESHOLD // 2):
        with Image.open(path) as image:
            buf = io.BytesIO()
            ImageOps.mirror(image.convert("RGB")).save(buf, "JPEG", quality=92)
        out.append((label, buf.getvalue()))
    return out


def _multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(12)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def send_feedback(r: rh.Rehearsal) -> list[str]:
    """Each new photo predicted, then its feedback with the image; returns the feedback ids."""
    ids: list[str] = []
    for label, image in _new_photos():
        status, pred = rh._http("POST", r.url("api", 8000, "/predict"), image, "image/jpeg")
        assert status == 200, f"predict: {status} {pred}"
        body, ctype = _multipart(
            {"prediction_id": pred["prediction_id"], "correct_label": label}, image
        )
        status, fb = rh._http("POST", r.url("api", 8000, "/feedback"), body, ctype)
        assert status == 201, f"feedback: {status} {fb}"
        assert fb["image_key"], f"feedback stored without its image: {fb}"
        ids.append(str(fb["feedback_id"]))
    return ids


def _run(r: rh.Rehearsal, dag: str, run_id: str) -> tuple[str, dict[str, str]]:
    """A run's state and its tasks' states, from the metadata database."""
    assert SAFE.fullmatch(dag) and SAFE.fullmatch(run_id), (dag, run_id)  # safe in a literal
    where = f"dag_id = '{dag}' and run_id = '{run_id}'"
    rows = rh._airflow_db(
        r,
        f"select '', state from dag_run where {where} union all "
        f"select task_id, coalesce(state, '') from task_instance where {where}",
    )
    state = next((s for t, s in rows if not t), "missing")
    return state, {t: s for t, s in rows if t}


def _wait_tasks(
    r: rh.Rehearsal, dag: str, run_id: str, done: Any, timeout_s: float
) -> dict[str, str]:
    last: tuple[str, dict[str, str]] = ("missing", {})

    def check() -> bool:
        nonlocal last
        last = _run(r, dag, run_id)
        return bool(done(*last))

    try:
        rh._wait(f"{dag} {run_id}", check, timeout_s, every=3)
    except StepFailed as exc:
        raise StepFailed(f"{exc}: {last}; {rh._airflow_diagnosis(r)}") from None
    return last[1]


def _xcom(r: rh.Rehearsal, dag: str, run_id: str, task: str, key: str) -> Any:
    rows = rh._airflow_db(
        r,
        f"select value from xcom where dag_id = '{dag}' and run_id = '{run_id}' "
        f"and task_id = '{task}' and key = '{key}'",
    )
    assert rows, f"no xcom {key} of {dag}.{task} in {run_id}"
    return json.loads(rows[0][0])


def _api(r: rh.Rehearsal, method: str, path: str, payload: dict[str, Any]) -> Any:
    """Airflow's REST API as the admin user of the simple auth manager."""
    password = json.loads(r.exec("airflow-apiserver", "cat", PASSWORDS))["admin"]
    base = r.url("airflow-apiserver", 8080)
    status, token = rh._http(
        "POST",
        f"{base}/auth/token",
        json.dumps({"username": "admin", "password": password}).encode(),
        "application/json",
    )
    assert status in (200, 201), f"token: {status} {token}"
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(payload).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {token['access_token']}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        raise StepFailed(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None


def _last_run(r: rh.Rehearsal, dag: str) -> int:
    """The id of the DAG's latest run (0: none): runs queued later have greater ids."""
    rows = rh._airflow_db(r, f"select coalesce(max(id), 0) from dag_run where dag_id = '{dag}'")
    return int(rows[0][0])


def _next_run(r: rh.Rehearsal, dag: str, after: int, timeout_s: float) -> tuple[str, str] | None:
    """The first run of ``dag`` queued after run id ``after`` (its run id and run type), once
    one exists; None if none within ``timeout_s``."""
    found: list[tuple[str, str]] = []

    def check() -> bool:
        rows = rh._airflow_db(
            r,
            f"select run_id, run_type from dag_run where dag_id = '{dag}' and id > {after} "
            "order by id limit 1",
        )
        found[:] = [(rows[0][0], rows[0][1])] if rows else []
        return bool(found)

    try:
        rh._wait(f"a {dag} run", check, timeout_s, every=2)
    except StepFailed:
        return None
    return found[0]


def _set_paused(r: rh.Rehearsal, dag: str, paused: bool) -> None:
    _api(r, "PATCH", f"/api/v2/dags/{dag}?update_mask=is_paused", {"is_paused": paused})


def _stop(r: rh.Rehearsal, dag: str, run_id: str) -> None:
    """Mark a run failed through the REST API: Airflow fails its running tasks and skips the
    pending ones, all but the teardown (`report`, left to run while the DAG is unpaused; the
    run then ends as its other leaves say). Waits until no other task of it is active."""
    _api(r, "PATCH", f"/api/v2/dags/{dag}/dagRuns/{quote(run_id, safe='')}", {"state": "failed"})
    _wait_tasks(
        r,
        dag,
        run_id,
        lambda _, t: not {s for task, s in t.items() if task != TEARDOWN} & ACTIVE,
        300,
    )


def _weekly_slot(r: rh.Rehearsal) -> str:
    """Unpause dandelion_retrain. It queues a run for its latest weekly slot at once (catchup
    is off); that run is stopped once its resolve_dataset (the task that takes accepted photos
    into a dataset version) has ended, before any photo is accepted: else it would take them
    itself and train on the default recipe, and max_active_runs=1 would keep the run the
    feedback asset starts queued behind it."""
    before = _last_run(r, RETRAIN_DAG)
    _set_paused(r, RETRAIN_DAG, False)
    found = _next_run(r, RETRAIN_DAG, before, 180)
    if found is None:
        return "none queued"
    run_id = found[0]
    tasks = _wait_tasks(
        r,
        RETRAIN_DAG,
        run_id,
        lambda state, t: t.get("resolve_dataset") in ENDED or state in ENDED,
        600,
    )
    ended = _run(r, RETRAIN_DAG, run_id)[0] in ENDED
    if not ended:
        _stop(r, RETRAIN_DAG, run_id)
    return f"{run_id}, resolve_dataset {tasks.get('resolve_dataset')}, {'ended' if ended else 'stopped'}"


def _announce(r: rh.Rehearsal, ids: list[str]) -> tuple[str, int]:
    """Unpause dandelion_feedback: its latest cron slot runs at once (catchup is off) and must
    announce the accepted photos. Returns the run id and the count it announced."""
    before = _last_run(r, FEEDBACK_DAG)
    _set_paused(r, FEEDBACK_DAG, False)
    found = _next_run(r, FEEDBACK_DAG, before, 90)
    if found is None:  # no slot run queued: a manual one counts the same way
        run_id = f"rehearsal-feedback-{int(time.time())}"
        rh._airflow(r, "dags", "trigger", FEEDBACK_DAG, "--run-id", run_id)
    else:
        run_id = found[0]
    tasks = _wait_tasks(r, FEEDBACK_DAG, run_id, lambda state, _: state in ENDED, 600)
    if tasks.get("announce_feedback") != "success":
        listing = r.exec("airflow-scheduler", "dandelion", "feedback", "list", "--json")
        raise StepFailed(
            f"{FEEDBACK_DAG} {run_id} announced nothing: {tasks}; sent {ids}; "
            f"feedback: {listing[-3000:]}"
        )
    return run_id, int(_xcom(r, FEEDBACK_DAG, run_id, "feedback_waiting", "accepted_waiting"))


def _resolved(r: rh.Rehearsal, mark: int, ids: list[str]) -> tuple[str, str]:
    """The first retrain run queued after run id ``mark`` (the one the feedback asset starts,
    run type asset_triggered; a weekly slot passing meanwhile would do as well) must resolve a
    dataset version holding every photo. Returns the run id and a description."""
    found = _next_run(r, RETRAIN_DAG, mark, 300)
    assert found, f"no {RETRAIN_DAG} run queued after the announcement"
    run_id, run_type = found
    tasks = _wait_tasks(
        r,
        RETRAIN_DAG,
        run_id,
        lambda state, t: t.get("resolve_dataset") in ENDED or state in ENDED,
        900,
    )
    assert tasks.get("resolve_dataset") == "success", f"{run_id}: {tasks}"
    resolved = _xcom(r, RETRAIN_DAG, run_id, "resolve_dataset", "return_value")
    version = _xcom(r, RETRAIN_DAG, run_id, "resolve_dataset", "dataset_version")
    manifest = rh._json_out(
        r.exec("airflow-scheduler", "python", "-c", MANIFEST_SOURCES, str(version))
    )
    missing = {f"feedback:{i}" for i in ids} - set(manifest["sources"])
    assert not missing, f"dataset version {version} lacks {sorted(missing)}: {manifest}"
    by = resolved.get("triggered_by") if isinstance(resolved, dict) else resolved
    return run_id, (
        f"{RETRAIN_DAG} {run_id} ({run_type}, triggered by {by}) resolved dataset version "
        f"{version} ({manifest['rows']} rows) holding all {len(ids)}"
    )


def feedback_loop(r: rh.Rehearsal) -> str:
    slot = _weekly_slot(r)
    ids = send_feedback(r)
    mark = _last_run(r, RETRAIN_DAG)
    r.exec("airflow-scheduler", "dandelion", "feedback", "review", *ids, "--accept")
    announced, waiting = _announce(r, ids)
    retrain, resolved = _resolved(r, mark, ids)
    # Training on the default recipe is not rehearsed here (see the module docstring).
    for dag in (RETRAIN_DAG, FEEDBACK_DAG):
        _set_paused(r, dag, True)
    _stop(r, RETRAIN_DAG, retrain)
    return (
        f"{len(ids)} photos sent with their images and accepted; {FEEDBACK_DAG} {announced} "
        f"announced {waiting} waiting; {resolved}; stopped before training (weekly slot run: "
        f"{slot})"
    )
