"""Least privilege and backups (finding 8): an S3 credential per component, the dev MinIO
policies that give each only its buckets/prefixes, versioned buckets, scheduled backups of
PostgreSQL and the object store; database URLs that set sslmode, a connect timeout and
keepalives (medium finding)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from deploy_support import OVERLAYS, ROOT, containers, find, load_all, pod_spec, workloads

Objects = dict[str, list[dict[str, Any]]]
MINIO = ROOT / "k8s" / "overlays" / "dev" / "minio"
SECRETS = ROOT / "k8s" / "secrets"
S3_KEY_NAMES = {"access-key-id", "AWS_ACCESS_KEY_ID"}
# component (its pods' app.kubernetes.io/name) -> the MinIO policy it gets
COMPONENT_POLICY = {"api": "api", "review": "review", "mlflow": "mlflow",
                    "object-store-backup": "backup", "postgres-backup": "backup"}  # fmt: skip


def s3_secret_of(obj: dict[str, Any]) -> set[str]:
    """Secrets a workload reads an S3 access key id from."""
    found = set()
    for c in containers(obj):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] in S3_KEY_NAMES and env["name"] != "MINIO_ROOT_USER":
                found.add(ref["name"])
    return found


def policy(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MINIO / "policies" / f"{name}.json").read_text())
    return doc


def grants(name: str) -> dict[str, set[str]]:
    """resource ARN -> actions the policy allows on it."""
    out: dict[str, set[str]] = {}
    for statement in policy(name)["Statement"]:
        assert statement["Effect"] == "Allow"
        for resource in statement["Resource"]:
            out.setdefault(resource, set()).update(statement["Action"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_component_has_its_own_s3_credential(rendered: Objects, overlay: str) -> None:
    users: dict[str, set[str]] = {}
    for obj in workloads(rendered[overlay]):
        name = obj["metadata"]["name"]
        if name == "minio-init":
            continue  # creates the users: it reads every component's key
        for secret in s3_secret_of(obj):
            users.setdefault(secret, set()).add(name)
    assert "dandelion-s3" not in users, "the shared credential is gone"
    shared = {s: names for s, names in users.items() if len(names) > 1}
    # The two backup CronJobs share the backup credential (one component: backups).
    assert shared in ({}, {"dandelion-s3-backup": {"postgres-backup", "object-store-backup"}})
    assert {"dandelion-s3-api", "dandelion-s3-review", "dandelion-s3-mlflow"} <= set(users)


def test_dev_minio_policies_are_least_privilege() -> None:
    api, review = grants("api"), grants("review")
    assert set(api) == {"arn:aws:s3:::dandelion/feedback/*", "arn:aws:s3:::dandelion"}
    assert api["arn:aws:s3:::dandelion/feedback/*"] == {"s3:GetObject", "s3:PutObject"}
    # The reviewer page reads feedback photos and the latest dataset's manifest, writes nothing.
    assert {r: a for r, a in review.items() if r.endswith("/*")} == {
        "arn:aws:s3:::dandelion/feedback/*": {"s3:GetObject"},
        "arn:aws:s3:::dandelion/datasets/*": {"s3:GetObject"},
    }
    for name, prefixes in (("api", ["feedback/*"]), ("review", ["feedback/*", "datasets/*"])):
        (listing,) = [s for s in policy(name)["Statement"] if "s3:ListBucket" in s["Action"]]
        assert listing["Condition"]["StringLike"]["s3:prefix"] == prefixes
    assert all(r.startswith("arn:aws:s3:::mlflow") for r in grants("mlflow"))
    pipeline = grants("pipeline")
    assert not [r for r in pipeline if "mlflow" in r or "backups" in r]
    sources = {a for r, acts in pipeline.items() if "dandelion-sources" in r for a in acts}
    assert sources and not {"s3:PutObject", "s3:DeleteObject"} & sources, "sources: read-only"
    backup = grants("backup")
    writable = {r for r, acts in backup.items() if "s3:PutObject" in acts}
    assert writable == {"arn:aws:s3:::dandelion-backups", "arn:aws:s3:::dandelion-backups/*"}
    assert not any("s3:DeleteObject" in acts for acts in backup.values())
    every = [a for name in ("api", "review", "mlflow", "pipeline", "backup")
             for acts in grants(name).values() for a in acts]  # fmt: skip
    assert "s3:*" not in every and not any(a.startswith("s3:PutBucket") for a in every)


def test_dev_setup_job_creates_a_user_per_component_with_its_secret(rendered: Objects) -> None:
    """setup-access.sh attaches policies/<component>.json to the key each component's pods
    read: the Job's <COMPONENT>_KEY comes from the same Secret as the component's own key."""
    objs = rendered["dev"]
    script = (MINIO / "setup-access.sh").read_text()
    (job,) = [o for o in objs if o["metadata"]["name"] == "minio-init"]
    env = {e["name"]: e for c in containers(job) for e in c.get("env", [])}
    cm = find(objs, "ConfigMap", pod_spec(job)["volumes"][0]["configMap"]["name"])
    own = {
        "API": s3_secret_of(find(objs, "Deployment", "api")),
        "REVIEW": s3_secret_of(find(objs, "Deployment", "review")),
        "MLFLOW": s3_secret_of(find(objs, "Deployment", "mlflow")),
        "PIPELINE": {"dandelion-pipeline-env"},
        "BACKUP": s3_secret_of(find(objs, "CronJob", "object-store-backup")),
    }
    for component, secrets in own.items():
        ref = env[f"{component}_KEY"]["valueFrom"]["secretKeyRef"]
        assert {ref["name"]} == secrets, component
        name = component.lower()
        assert f'user {name} "${component}_KEY" "${component}_SECRET"' in script
        assert f"{name}.json" in cm["data"], f"policy {name} not mounted"
        json.loads(cm["data"][f"{name}.json"])


def test_buckets_are_created_versioned_and_named_consistently(rendered: Objects) -> None:
    script = (MINIO / "setup-access.sh").read_text()
    (buckets,) = re.findall(r"^for bucket in (.+); do$", script, re.M)
    created = set(buckets.split())
    assert 'mc version enable "local/$bucket"' in script
    config = find(rendered["dev"], "ConfigMap", "dandelion-config")["data"]
    used = {
        config["DANDELION_STORE_URL"].split("/")[2],
        config["MLFLOW_ARTIFACTS_DESTINATION"].split("/")[2],
        config["DANDELION_SOURCE"].split("/")[2],
        config["DANDELION_NEGATIVES_SOURCE"].split("/")[2],
        config["BACKUP_BUCKET"],
        *config["BACKUP_SOURCE_BUCKETS"].split(),
    }
    assert used == created, (used, created)
    for name in ("api", "review", "mlflow", "pipeline", "backup"):
        for resource in grants(name):
            assert resource.removeprefix("arn:aws:s3:::").split("/")[0] in created, resource


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_backups_are_scheduled(rendered: Objects, overlay: str) -> None:
    objs = rendered[overlay]
    config = find(objs, "ConfigMap", "dandelion-config")["data"]
    for name in ("postgres-backup", "object-store-backup"):
        cron = find(objs, "CronJob", name)
        assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", cron["spec"]["schedule"])
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        upload = [c for c in containers(cron) if c["name"] == "upload"]
        assert upload and s3_secret_of(cron) == {"dandelion-s3-backup"}
    mirrored = set(config["BACKUP_SOURCE_BUCKETS"].split())
    for key in ("DANDELION_STORE_URL", "MLFLOW_ARTIFACTS_DESTINATION", "DANDELION_SOURCE"):
        assert config[key].split("/")[2] in mirrored, key
    assert config["BACKUP_BUCKET"] not in mirrored
    dump = [c for c in containers(find(objs, "CronJob", "postgres-backup")) if c["name"] == "dump"]
    (dump_c,) = dump
    assert dump_c["envFrom"] == [{"secretRef": {"name": "dandelion-backup-db"}}]
    databases = {e["name"]: e["value"] for e in dump_c["env"]}["DATABASES"].split()
    manual = (ROOT / "scripts" / "backup-postgres.sh").read_text()
    (default,) = re.findall(r"DATABASES:-([a-z ]+)\}", manual)
    assert databases == default.split(), "the same databases as scripts/backup-postgres.sh"


def test_in_cluster_dump_keeps_the_manual_backup_layout() -> None:
    """scripts/restore-postgres.sh restores what the CronJob writes: same folder name, one
    custom-format archive per database, SHA256SUMS."""
    manual = (ROOT / "scripts" / "backup-postgres.sh").read_text()
    job = (ROOT / "k8s" / "base" / "backup" / "dump-postgres.sh").read_text()
    for line in ('dir="${out%/}/postgres-$(date -u +%Y%m%dT%H%M%SZ)"',
                 'archive="$dir/$db.dump"',
                 '(cd "$dir" && sha256sum -- *.dump > SHA256SUMS)'):  # fmt: skip
        assert line in manual and line in job, line
    assert 'pg_dump --format=custom --no-owner --dbname="$db" --file="$archive"' in job


def _db_urls(text: str) -> list[str]:
    return re.findall(r"postgresql\+psycopg(?:_async)?://[^\"'\s]+", text)


def test_database_urls_set_sslmode_timeout_and_keepalives() -> None:
    template = (SECRETS / "secrets.example.yaml").read_text()
    urls = _db_urls(template)
    assert len(urls) >= 5
    for url in urls:
        query = url.split("?", 1)[1] if "?" in url else ""
        params = dict(p.split("=", 1) for p in query.split("&") if p)
        assert params.get("sslmode") in {"require", "verify-ca", "verify-full"}, url
        assert int(params.get("connect_timeout", "0")) > 0, url
        assert params.get("keepalives") == "1" and "keepalives_idle" in params, url
    dev = (SECRETS / "create-dev-secrets.sh").read_text()
    (db_params,) = re.findall(r'^db_params="([^"]+)"$', dev, re.M)
    assert {"connect_timeout", "keepalives", "sslmode"} <= {
        p.split("=")[0] for p in db_params.split("&")}  # fmt: skip
    dev_urls = _db_urls(dev)
    assert len(dev_urls) >= 5 and all(u.endswith("?${db_params}") for u in dev_urls), dev_urls


def test_credentials_table_documents_every_component() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    section = doc[doc.index("### Credentials per component") :]
    section = section[: section.index("\n## ")]
    for secret in ("dandelion-s3-api", "dandelion-s3-review", "dandelion-s3-mlflow",
                   "dandelion-pipeline-env", "dandelion-s3-backup"):  # fmt: skip
        assert f"`{secret}`" in section, secret
    assert "versioning" in section.lower()
    for path in sorted((MINIO / "policies").glob("*.json")):
        assert f"policies/{path.name}" in section or path.stem in section, path.name


def test_policies_are_listed_in_the_dev_kustomization() -> None:
    kustomization = (ROOT / "k8s" / "overlays" / "dev" / "kustomization.yaml").read_text()
    for path in sorted(Path(MINIO / "policies").glob("*.json")):
        assert f"minio/policies/{path.name}" in kustomization
    assert load_all(kustomization)
