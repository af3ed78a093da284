"""Airflow Helm values: KubernetesExecutor and its provider, DAGs baked into the pipeline image,
the FAB auth manager and its admin user, migrations with our image, writable volumes under a
read-only root, remote task logs, StatsD values applied, the chart's API-server policy.

The chart cannot be fetched or rendered here (no Helm repository access), so the values are
checked for the settings and cross-references this project depends on; the chart's behaviour
each check relies on is cited from its templates and values (apache/airflow, chart/)."""

from __future__ import annotations

import re
from typing import Any

from deploy_support import KUBERNETES_VERSION, ROOT, load, load_all, run, tool

AIRFLOW = ROOT / "k8s" / "airflow"
DEPLOY = ROOT / "k8s" / "deploy.sh"


def values() -> dict[str, Any]:
    return load(AIRFLOW / "values.yaml")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.split()[0]
    return pins


def test_executor_image_statsd_and_external_database() -> None:
    v = values()
    assert v["executor"] == "KubernetesExecutor"
    assert v["images"]["airflow"]["repository"].endswith("/dandelion-pipeline")
    assert v["images"]["airflow"]["tag"] != "latest"
    assert v["statsd"]["enabled"] is True
    assert v["config"]["metrics"]["statsd_on"] == "True"
    assert v["postgresql"]["enabled"] is False, "metadata DB is the platform's PostgreSQL"
    assert v["airflowVersion"] == "3.3.2"


def test_airflow_version_matches_the_lock() -> None:
    assert lock_pins()["apache-airflow"] == values()["airflowVersion"]


def test_finding_1_4_10_providers_the_values_rely_on_are_locked() -> None:
    """Airflow 3 loads KubernetesExecutor from the cncf-kubernetes provider, the FAB auth
    manager from the fab provider and the S3 task handler from the amazon provider: each must be
    in the lock the pipeline image installs (the `pipeline` extra of pyproject.toml)."""
    v = values()
    needed = {"apache-airflow-providers-cncf-kubernetes": v["executor"] == "KubernetesExecutor"}
    needed["apache-airflow-providers-fab"] = "providers.fab." in v["config"]["core"]["auth_manager"]
    needed["apache-airflow-providers-amazon"] = v["config"]["logging"]["remote_logging"] == "True"
    pins = lock_pins()
    pyproject = (ROOT / "pyproject.toml").read_text()
    missing = [name for name, used in needed.items() if used and name not in pins]
    assert not missing, f"requirements.lock lacks {missing}"
    assert all(name in pyproject for name, used in needed.items() if used)


def test_finding_4_fab_auth_manager_and_admin_from_a_secret() -> None:
    v = values()
    assert v["config"]["core"]["auth_manager"] == (
        "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
    )
    # The chart's create-user job takes the password from values: off (chart templates/jobs/
    # create-user-job.yaml renders when webserver.defaultUser.enabled).
    assert v["webserver"]["defaultUser"]["enabled"] is False
    proc = run(tool("kubectl"), "kustomize", str(AIRFLOW / "admin-user"))
    assert proc.returncode == 0, proc.stderr
    (job,) = load_all(proc.stdout)
    import kubernetes_validate

    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AIRFLOW__CORE__AUTH_MANAGER"]["value"] == v["config"]["core"]["auth_manager"]
    for name in ("ADMIN_USERNAME", "ADMIN_PASSWORD", "ADMIN_EMAIL"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "airflow-admin"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]["valueFrom"]["secretKeyRef"] == {
        "name": v["data"]["metadataSecretName"],
        "key": "connection",
    }
    command = " ".join(container["command"])
    assert "airflow users create" in command and '"$ADMIN_PASSWORD"' in command
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Airflow writes a default airflow.cfg under AIRFLOW_HOME: it must be on the writable volume.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["AIRFLOW_HOME"]["value"].startswith("/tmp") and "/tmp" in mounts
    templates = {
        d["metadata"]["name"]: d
        for d in load_all((ROOT / "k8s/secrets/secrets.example.yaml").read_text())
    }
    assert {"username", "password", "email"} <= set(templates["airflow-admin"]["stringData"])
    assert "airflow-admin" in (ROOT / "k8s/secrets/create-dev-secrets.sh").read_text()
    deploy = DEPLOY.read_text()
    assert deploy.index("helm upgrade --install") < deploy.index("job/airflow-admin-user")


def test_finding_6_migrations_use_our_image() -> None:
    """chart/values.yaml: `useDefaultImageForMigration: true` runs the migration job and the
    wait-for-migrations containers with defaultAirflowRepository:defaultAirflowTag."""
    images = values()["images"]
    assert images["useDefaultImageForMigration"] is False
    assert images["migrationsWaitTimeout"] >= 60
    deploy = DEPLOY.read_text()
    assert '"images.airflow.repository=${PIPELINE_REPOSITORY}"' in deploy
    assert '"images.airflow.tag=${VERSION}"' in deploy


def test_finding_7_9_dags_come_from_the_image_of_the_release() -> None:
    """No git-sync (whose container needs a writable HOME for its gitconfig): the DAGs and the
    notebooks are those baked into the pipeline image, so they always match its dandelion_lib."""
    v = values()
    assert v["dags"]["gitSync"]["enabled"] is False
    assert v["dags"]["persistence"]["enabled"] is False
    dags_folder = v["config"]["core"]["dags_folder"]
    dockerfile = (ROOT / "docker" / "pipeline.Dockerfile").read_text()
    workdir = re.findall(
        r"^WORKDIR (\S+)\nCOPY dags/ dags/\nCOPY notebooks/ notebooks/", dockerfile, re.M
    )
    assert workdir and f"{workdir[0]}/dags" == dags_folder, (dags_folder, workdir)
    assert "dags.gitSync" not in DEPLOY.read_text()


def test_finding_3_workdir_and_every_written_path_is_a_declared_volume() -> None:
    """DANDELION_WORKDIR reaches every Airflow pod through extraEnvFrom (the ConfigMap): it must
    be a mounted volume, as /tmp and HOME are, since the root filesystem is read-only."""
    v = values()
    assert v["securityContexts"]["containers"]["readOnlyRootFilesystem"] is True
    assert v["securityContexts"]["pod"]["runAsUser"] == v["uid"] == 50000
    mounts = {m["mountPath"]: m["name"] for m in v["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in v["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    for base in ("dev", "prod"):
        proc = run(tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / base))
        config = next(
            o["data"]
            for o in load_all(proc.stdout)
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "dandelion-config"
        )
        assert config["DANDELION_WORKDIR"] in mounts, base
        assert config["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].startswith("s3://")
    env = {e["name"]: e["value"] for e in v["env"]}
    assert env["HOME"] in mounts and env["JUPYTER_RUNTIME_DIR"].startswith(env["HOME"])


def test_finding_10_remote_logs_and_statsd_values_applied() -> None:
    v = values()
    logging = v["config"]["logging"]
    assert logging["remote_logging"] == "True"
    assert logging["remote_log_conn_id"] == "dandelion_s3"
    for base in ("dev", "prod"):
        patch = load(ROOT / "k8s" / "overlays" / base / "patches" / "configmap.yaml")["data"]
        import json

        conn = json.loads(patch["AIRFLOW_CONN_" + logging["remote_log_conn_id"].upper()])
        assert conn["conn_type"] == "aws"
        bucket = patch["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].split("/")[2]
        assert f"s3://{bucket}" in (patch.get("DANDELION_STORE_URL", "s3://dandelion"))
    assert v["config"]["kubernetes_executor"]["delete_worker_pods"] == "True"
    deploy = DEPLOY.read_text()
    assert "-f monitoring/airflow-statsd-values.yaml" in deploy
    statsd = load(ROOT / "monitoring" / "airflow-statsd-values.yaml")["statsd"]
    assert statsd["overrideMappings"], "the mapping the dashboards and alerts rely on"


def test_secrets_come_from_templates() -> None:
    v = values()
    templates = {
        doc["metadata"]["name"]: set(doc["stringData"])
        for doc in load_all((ROOT / "k8s" / "secrets" / "secrets.example.yaml").read_text())
    }
    expected = {
        v["data"]["metadataSecretName"]: "connection",
        v["fernetKeySecretName"]: "fernet-key",
        v["apiSecretKeySecretName"]: "api-secret-key",
        v["jwtSecretName"]: "jwt-secret",
    }
    for name, key in expected.items():
        assert key in templates[name], (name, key)
    for item in v["secret"]:
        assert item["secretKey"] in templates[item["secretName"]]
    env_from = load_all(v["extraEnvFrom"])[0]
    assert {"configMapRef": {"name": "dandelion-config"}} in env_from
    (secret_ref,) = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= templates[secret_ref]


def test_overrides_and_chart_version_are_consistent() -> None:
    for env in ("dev", "prod"):
        override = load(AIRFLOW / f"values-{env}.yaml")
        assert set(override) <= set(values()), f"values-{env}.yaml sets unknown top-level keys"
    cd = (ROOT / ".github" / "workflows" / "cd.yml").read_text()
    kind = (ROOT / ".github" / "workflows" / "kind.yml").read_text()
    deploy = DEPLOY.read_text()
    assert 'AIRFLOW_CHART_VERSION: "1.22.0"' in cd
    assert 'AIRFLOW_CHART_VERSION: "1.22.0"' in kind
    assert "AIRFLOW_CHART_VERSION:-1.22.0" in deploy
    assert "--version 1.22.0" in (AIRFLOW / "values.yaml").read_text()
