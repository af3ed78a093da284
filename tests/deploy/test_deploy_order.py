"""The Kubernetes bootstrap order and what deploy.sh passes on: Airflow's migration as our own
Job before Helm, no Helm hook for `--wait` to deadlock on (finding 1); every pod can pull from
the private registry (finding 3); task pods pinned by digest; server-side apply that survives a
`rollout undo`; MLflow's memory limit (medium findings). The chart's behaviour relied on is
cited from its templates (apache/airflow, chart/), chart version pinned in k8s/deploy.sh."""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploy_support import (
    KUBERNETES_VERSION,
    OVERLAYS,
    ROOT,
    containers,
    find,
    load,
    load_all,
    pod_spec,
    run,
    tool,
    workloads,
)

Objects = dict[str, list[dict[str, Any]]]
AIRFLOW = ROOT / "k8s" / "airflow"
DEPLOY = ROOT / "k8s" / "deploy.sh"
PULL_SECRET = "dandelion-registry"


def values() -> dict[str, Any]:
    return load(AIRFLOW / "values.yaml")


def airflow_job(name: str) -> dict[str, Any]:
    proc = run(tool("kubectl"), "kustomize", str(AIRFLOW / name))
    assert proc.returncode == 0, proc.stderr
    (job,) = load_all(proc.stdout)
    return job


def test_finding_1_chart_migration_job_off_and_no_hook() -> None:
    """chart templates/jobs/migrate-database-job.yaml renders only with
    migrateDatabaseJob.enabled, as a post-install/post-upgrade hook when useHelmHooks."""
    migrate = values()["migrateDatabaseJob"]
    assert migrate["enabled"] is False and migrate["useHelmHooks"] is False
    # The chart's create-user Job (also a hook) stays off: the admin user is our Job.
    assert values()["webserver"]["defaultUser"]["enabled"] is False
    # The wait-for-migrations init containers stay, with our image, and wait for our Job.
    assert values()["images"]["useDefaultImageForMigration"] is False


def test_finding_1_our_migration_job_runs_airflow_db_migrate() -> None:
    import kubernetes_validate

    job = airflow_job("migrate-db")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"][-1] == "exec airflow db migrate"
    assert container["image"] == airflow_job("admin-user")["spec"]["template"]["spec"][
        "containers"][0]["image"]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]["valueFrom"]["secretKeyRef"] == {
        "name": values()["data"]["metadataSecretName"], "key": "connection"}  # fmt: skip
    assert env["AIRFLOW__CORE__AUTH_MANAGER"]["value"] == values()["config"]["core"]["auth_manager"]
    # The data services' policies admit it as an Airflow pod (tier=airflow).
    assert pod["metadata"]["labels"]["tier"] == "airflow"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_finding_1_deploy_migrates_before_helm_and_helm_waits() -> None:
    text = DEPLOY.read_text()
    body = text[text.index("# --- 4. Airflow") : text.index("# --- 5.")]
    order = [
        'apply -f "$work/migrate-db.yaml"',
        "job/airflow-migrate-db",
        "helm upgrade --install",
        "--wait --timeout",
        'apply -f "$work/admin-user.yaml"',
    ]
    positions = [body.index(marker) for marker in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    assert "--no-hooks" not in body, "nothing to skip: the chart renders no hook"
    # The previous run of the one-shot Job is removed first (a finished Job is immutable).
    assert body.index("delete job -l app.kubernetes.io/name=airflow-migrate-db") < positions[0]
    deadline = airflow_job("migrate-db")["spec"]["activeDeadlineSeconds"]
    budget = int(re.search(r"^AIRFLOW_MIGRATE_TIMEOUT_S=(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    assert deadline < budget, "the Job fails as itself (with its logs) before the wait gives up"


def _helm_args(**env: str) -> list[str]:
    """deploy.sh's helm_args block, run by bash with the given environment."""
    text = DEPLOY.read_text()
    block = text[text.index('task_tag="$VERSION"') : text.index("helm repo add")]
    proc = run("bash", "-c", block + '\nprintf "%s\\n" "${helm_args[@]}"', env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")


def test_task_pods_run_the_pinned_digest() -> None:
    digest = "sha256:" + "ab" * 32
    args = _helm_args(
        VERSION="1.2.3",
        PIPELINE_REPOSITORY="ghcr.io/o/dandelion-pipeline",
        PIPELINE_IMAGE=f"ghcr.io/o/dandelion-pipeline@{digest}",
    )
    for key in ("images.pod_template.tag", "config.kubernetes_executor.worker_container_tag"):
        assert f"{key}=1.2.3@{digest}" in args, (key, args)
    for key in ("images.pod_template.repository",
                "config.kubernetes_executor.worker_container_repository"):  # fmt: skip
        assert f"{key}=ghcr.io/o/dandelion-pipeline" in args
    assert f"images.airflow.digest={digest}" in args
    # Without a digest (kind's local builds) the tag alone.
    args = _helm_args(VERSION="abc", PIPELINE_REPOSITORY="localhost:5001/dandelion-pipeline")
    assert "config.kubernetes_executor.worker_container_tag=abc" in args
    # The values' defaults name the same repository the components use.
    v = values()
    executor = v["config"]["kubernetes_executor"]
    assert executor["worker_container_repository"] == v["images"]["airflow"]["repository"]
    assert v["images"]["pod_template"]["repository"] == v["images"]["airflow"]["repository"]


def test_server_side_apply_takes_fields_back_after_a_rollout_undo() -> None:
    text = DEPLOY.read_text()
    (definition,) = re.findall(r"^apply\(\) \{ (.+) \}$", text, re.M)
    assert "--server-side" in definition and "--force-conflicts" in definition
    direct = [
        line for line in text.splitlines() if "kubectl apply" in line and "apply()" not in line
    ]
    assert direct == [] or all(line.lstrip().startswith("#") for line in direct), direct
    assert len(re.findall(r"^apply -f|\| apply -f", text, re.M)) >= 6


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finding_3_every_pod_can_pull_from_the_private_registry(
    rendered: Objects, overlay: str
) -> None:
    objs = rendered[overlay] + [airflow_job("migrate-db"), airflow_job("admin-user")]
    pods = workloads(objs)
    assert len(pods) >= (12 if overlay == "dev" else 9)
    for obj in pods:
        secrets = [s["name"] for s in pod_spec(obj).get("imagePullSecrets", [])]
        assert PULL_SECRET in secrets, f"{obj['kind']}/{obj['metadata']['name']}"
    assert find(rendered[overlay], "ServiceAccount", "airflow-worker")["imagePullSecrets"] == [
        {"name": PULL_SECRET}
    ]


def test_finding_3_the_chart_and_deploy_sh_use_the_pull_secret() -> None:
    """The chart puts registry.secretName in every pod's imagePullSecrets (its components',
    its Jobs' and the KubernetesExecutor pod template's). deploy.sh creates the Secret from the
    environment without the password on a command line; the template documents it."""
    assert values()["registry"]["secretName"] == PULL_SECRET
    text = DEPLOY.read_text()
    assert 'os.environ["REGISTRY_PASSWORD"]' in text and "--docker-password" not in text
    assert '"name": "dandelion-registry"' in text
    (template,) = [
        d
        for d in load_all((ROOT / "k8s" / "secrets" / "secrets.example.yaml").read_text())
        if d["metadata"]["name"] == PULL_SECRET
    ]
    assert template["type"] == "kubernetes.io/dockerconfigjson"
    cd = (ROOT / ".github" / "workflows" / "cd.yml").read_text()
    assert cd.count("REGISTRY_PASSWORD: ${{ secrets.") == 2
    kind = (ROOT / ".github" / "workflows" / "kind.yml").read_text()
    assert "REGISTRY_PASSWORD:" in kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_memory_limit_is_what_compose_needed(rendered: Objects, overlay: str) -> None:
    """compose's MLflow was OOM-killed at 1g and runs at 2g."""
    (c,) = [c for c in containers(find(rendered[overlay], "Deployment", "mlflow"))]
    limit = c["resources"]["limits"]["memory"]
    units = {"Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    assert int(number) * units[unit] >= 2 * 2**30, limit


def test_kind_job_checks_the_fixed_order_statically() -> None:
    """The kind job cannot run here: its steps are checked for what they must verify."""
    kind = load(ROOT / ".github" / "workflows" / "kind.yml")
    runs = "\n".join(s.get("run", "") for s in kind["jobs"]["kind"]["steps"])
    for needle in (
        'helm -n "$NAMESPACE" get hooks airflow',
        "job airflow-migrate-db",
        "restartCount",
        "kubectl auth can-i",
        'create job --from="cronjob/${cronjob}"',
        'SEED_SOURCES_DIR="$RUNNER_TEMP/seed"',
        "bash k8s/deploy.sh",
    ):
        assert needle in runs, needle
    assert runs.index("bash k8s/deploy.sh") < runs.index("get hooks airflow")
