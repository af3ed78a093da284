"""A backup restored into a fresh stack, a step of `nox -s rehearse` (deploy/rehearse.py).

The running stack is backed up with the project's scripts, as an operator would:
`scripts/backup-postgres.sh` in its compose mode (pg_dump inside the postgres service; the
`mlflow`, `airflow` and `feedback` databases) and `scripts/backup-object-store.sh` (`aws s3
sync` of the `dandelion` and `mlflow` buckets, through the S3 port published on loopback).
A second compose project from the same files then starts fresh, empty storage (PostgreSQL on a
new volume, whose first start creates the roles and empty databases; a new S3 server), the
scripts restore into it, and MLflow is started on the restored database and bucket. Checked
through the components: MLflow's registry finds the `champion` alias at the same version and
run, and its model's artifacts download through the restored MLflow server byte for byte as
they were backed up; the library finds every dataset version, the same `datasets/latest`,
each manifest with its rows, and as many objects with their recorded sha256 as before (the
backup keeps them beside the bytes: deploy/object_checksums.py); the feedback rows and the Airflow runs are all there (psql), and
every feedback image is in the restored store.

Only the storage and MLflow of the fresh stack run: the API, the app and the Airflow services
are not started on the restored data (the Airflow metadata database is restored and counted,
not served), which keeps the step to about a minute.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy import dockerkit as dk
from deploy import rehearse as rh
from deploy.dockerkit import ROOT, StepFailed

RESTORE_PROJECT = f"{rh.PROJECT}-restore"
STORAGE = ("postgres", "minio", "minio-init")
BUCKETS = ("dandelion", "mlflow")  # compose.yaml's STORE_BUCKET and MLFLOW_BUCKET defaults
# The store as the library reads it (host interpreter: the session's environment): every
# dataset version with its manifest's rows (checked against its recorded sha256 when one is
# recorded), the latest pointer, the object count, how many objects and manifests carry a
# recorded sha256, and which of the keys given are missing.
STORE_STATE = """
import json, os, sys
from dandelion_lib.core.storage import S3Store
from dandelion_lib.data import dataset
store = S3Store(sys.argv[1], endpoint_url=os.environ["S3_ENDPOINT_URL"])
versions = dataset.list_versions(store)
keys = list(store.list())
infos = [store.info(dataset.manifest_key(v)) for v in versions]
print(json.dumps({
    "objects": len(keys),
    "objects_with_sha256": sum(1 for k in keys if (i := store.info(k)) and i.sha256),
    "latest": dataset.latest_version(store) if versions else None,
    "versions": {v: len(dataset.load_manifest(store, v)) for v in versions},
    "manifests_with_sha256": sum(1 for i in infos if i and i.sha256),
    "missing": [k for k in sys.argv[2:] if not store.exists(k)],
}))
"""
# The champion's artifacts through the restored MLflow server, as a client in the stack gets
# them (the API does the same): the models:/ URI resolved in the registry, each file fetched
# from the bucket (the server hands out presigned URLs on the S3 server's in-stack name, which
# only the stack's network resolves). Run in a one-off container of the MLflow image; prints
# each file's sha256 but `registered_model_meta`, which the client writes itself (the name
# and version of the registered model it downloaded).
DOWNLOAD = """
import hashlib, json, os, mlflow
mlflow.set_tracking_uri("http://mlflow:5000")
path = mlflow.artifacts.download_artifacts("models:/dandelion@champion", dst_path="/tmp/champion")
files = {}
for folder, _, names in os.walk(path):
    for name in set(names) - {"registered_model_meta"}:
        with open(os.path.join(folder, name), "rb") as f:
            files[os.path.relpath(os.path.join(folder, name), path)] = hashlib.sha256(
                f.read()).hexdigest()
print(json.dumps(files))
"""


def _env(r: rh.Rehearsal, project: str, s3_port: int) -> dict[str, str]:
    """The scripts' environment: compose mode on ``project``, its S3 server on loopback with
    the stack's keys (the rehearsal's S3 stand-in takes any)."""
    return {
        **r.env,
        "COMPOSE": "1",
        "COMPOSE_PROJECT_NAME": project,
        "COMPOSE_FILE": f"{ROOT / 'compose.yaml'}:{rh.OVERRIDE}",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": r.env["S3_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": r.env["S3_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "BUCKETS": " ".join(BUCKETS),
    }


def _checked(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    """``cmd``'s standard output; a failure is the step's, naming ``what`` failed."""
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise StepFailed(f"{what} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def _script(env: dict[str, str], name: str, *args: str) -> str:
    return _checked(["bash", str(ROOT / "scripts" / name), *args], env, 600, f"scripts/{name}")


def _store_state(r: rh.Rehearsal, s3_port: int, keys: list[str]) -> dict[str, Any]:
    env = _env(r, r.project, s3_port)
    out = _checked(
        [sys.executable, "-c", STORE_STATE, BUCKETS[0], *keys], env, 300, "reading the store"
    )
    state: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return state


def _sql(r: rh.Rehearsal, db: str, query: str) -> list[str]:
    """The first field of each row of a query on ``db``."""
    return [row[0] for row in rh.psql(r, db, query)]


def _champion(r: rh.Rehearsal) -> tuple[str, str]:
    url = r.url(
        "mlflow", 5000, "/api/2.0/mlflow/registered-models/alias?name=dandelion&alias=champion"
    )
    status, body = rh._http("GET", url)
    assert status == 200, f"no champion in {r.project}'s MLflow: {status} {body}"
    return str(body["model_version"]["version"]), str(body["model_version"]["run_id"])


def _hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _state(r: rh.Rehearsal) -> dict[str, Any]:
    """What must come back: the champion, the datasets, the feedback rows and images, the
    Airflow runs."""
    images = _sql(
        r, "feedback", "select image_key from feedback where image_key is not null order by 1"
    )
    return {
        "champion": _champion(r),
        "feedback_rows": rh._feedback_rows(r),
        "dag_runs": int(_sql(r, "airflow", "select count(*) from dag_run")[0]),
        "store": _store_state(r, r.port("minio", 9000), images),
        "images": images,
    }


def _backup(r: rh.Rehearsal, folder: Path) -> tuple[Path, str]:
    env = _env(r, r.project, r.port("minio", 9000))
    _script(env, "backup-postgres.sh", str(folder))
    _script(env, "backup-object-store.sh", str(folder))
    (dumps,) = folder.glob("postgres-*")
    sizes = ", ".join(
        f"{p.stem} {p.stat().st_size // 1024} KiB" for p in sorted(dumps.glob("*.dump"))
    )
    objects = ", ".join(
        f"{b} {sum(1 for p in (folder / b).rglob('*') if p.is_file())}" for b in BUCKETS
    )
    return dumps, f"dumps: {sizes}; objects: {objects}"


def _fresh_storage(fresh: rh.Rehearsal) -> None:
    """Empty storage on new volumes: the databases have no tables, the store no object."""
    fresh.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
    servers, init = STORAGE[:-1], STORAGE[-1]
    fresh.compose(
        "up", "-d", "--no-build", "--wait", "--wait-timeout", "300", *servers, timeout=400
    )
    # The one-shot bucket set-up runs to its end here: `up --wait` counts a container that
    # has exited, even with status 0, as a failure when the service is named on its own.
    fresh.compose("run", "--rm", "--no-deps", "-T", init, timeout=300)
    for db in ("mlflow", "airflow", "feedback"):
        tables = _sql(fresh, db, "select count(*) from pg_tables where schemaname = 'public'")
        assert tables == ["0"], f"fresh database {db} is not empty: {tables}"


def _restore(r: rh.Rehearsal, fresh: rh.Rehearsal, dumps: Path, folder: Path) -> None:
    env = _env(r, fresh.project, fresh.port("minio", 9000))
    _script(env, "restore-postgres.sh", str(dumps), "--yes")
    # MLflow starts on the restored registry while the buckets are restored (it reads the
    # artifacts only when asked).
    fresh.compose("up", "-d", "--no-build", "--no-deps", "mlflow")
    empty = _store_state(fresh, fresh.port("minio", 9000), [])
    assert empty["objects"] == 0, f"fresh store not empty: {empty}"
    _script(env, "restore-object-store.sh", str(folder), "--yes")


def _compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    b, a = before["store"], after["store"]
    for what in ("champion", "feedback_rows", "dag_runs", "images"):
        assert after[what] == before[what], f"{what}: {before[what]} before, {after[what]} after"
    checked = ("objects", "latest", "versions", "objects_with_sha256", "manifests_with_sha256")
    for what in checked:
        assert a[what] == b[what], f"store {what}: {b[what]} before, {a[what]} after"
    assert not a["missing"], f"feedback images missing after the restore: {a['missing']}"


def _artifacts_as_backed_up(fresh: rh.Rehearsal, folder: Path) -> int:
    """The champion's artifact files, downloaded through the restored MLflow, must be byte for
    byte files of the backed-up bucket; returns how many there are."""
    out = fresh.compose(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "mlflow", "-c", DOWNLOAD,
        timeout=300,
    ).stdout  # fmt: skip
    files: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    backed_up = _hashes(folder / BUCKETS[1])
    changed = sorted(f for f, h in files.items() if h not in backed_up)
    assert files and not changed, f"champion artifacts not as backed up: {changed or files}"
    return len(files)


def _summary(taken: str, before: dict[str, Any], after: dict[str, Any], files: int) -> str:
    store, (version, run) = after["store"], after["champion"]
    return (
        f"backed up ({taken}); restored into fresh storage ({RESTORE_PROJECT}: "
        f"{', '.join(STORAGE)} on new volumes, then MLflow): champion v{version} (run "
        f"{run[:8]}) found, its {files} artifact files downloaded through MLflow as backed "
        f"up; {len(store['versions'])} dataset versions (latest {store['latest']}, "
        f"{store['objects']} store objects) as before; feedback rows {before['feedback_rows']} "
        f"before, {after['feedback_rows']} after, their {len(after['images'])} images in the "
        f"store; Airflow runs {before['dag_runs']} -> {after['dag_runs']}; objects with "
        f"their recorded sha256: {before['store']['objects_with_sha256']} before, "
        f"{store['objects_with_sha256']} after (manifests "
        f"{store['manifests_with_sha256']} of {len(store['versions'])})"
    )


def backup_restored(r: rh.Rehearsal) -> str:
    folder = r.workdir / "backup"
    before = _state(r)
    assert before["store"]["versions"] and before["feedback_rows"], before
    dumps, taken = _backup(r, folder)
    fresh = replace(r, project=RESTORE_PROJECT, steps=[], ports={})
    fresh.env = {**r.env, "COMPOSE_PROJECT_NAME": RESTORE_PROJECT}
    try:
        _fresh_storage(fresh)
        _restore(r, fresh, dumps, folder)
        rh._wait(
            "MLflow on the restored storage",
            lambda: dk.http_status(fresh.url("mlflow", 5000, "/health")) == 200,
            300,
        )
        after = _state(fresh)
        _compare(before, after)
        files = _artifacts_as_backed_up(fresh, folder)
    finally:
        fresh.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False, timeout=300)
    return _summary(taken, before, after, files)
