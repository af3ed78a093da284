"""Airflow Helm values: KubernetesExecutor, git-sync of the DAGs, the pipeline image, StatsD.

The chart itself cannot be fetched or rendered here (no Helm repository access), so the values
are checked for the settings and cross-references this project depends on."""

from __future__ import annotations

from typing import Any

from deploy_support import ROOT, load, load_all

AIRFLOW = ROOT / "k8s" / "airflow"


def values() -> dict[str, Any]:
    return load(AIRFLOW / "values.yaml")


def test_executor_image_gitsync_statsd() -> None:
    v = values()
    assert v["executor"] == "KubernetesExecutor"
    assert v["images"]["airflow"]["repository"].endswith("/dandelion-pipeline")
    assert v["images"]["airflow"]["tag"] != "latest"
    sync = v["dags"]["gitSync"]
    assert sync["enabled"] is True and sync["subPath"] == "dags"
    assert v["dags"]["persistence"]["enabled"] is False
    assert v["statsd"]["enabled"] is True
    assert v["config"]["metrics"]["statsd_on"] == "True"
    assert v["postgresql"]["enabled"] is False, "metadata DB is the platform's PostgreSQL"
    assert v["airflowVersion"] == "3.3.2"


def test_airflow_version_matches_the_lock() -> None:
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert f"apache-airflow=={values()['airflowVersion']}" in lock


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
    deploy = (ROOT / "k8s" / "deploy.sh").read_text()
    assert 'AIRFLOW_CHART_VERSION: "1.22.0"' in cd
    assert "AIRFLOW_CHART_VERSION:-1.22.0" in deploy
    assert "--version 1.22.0" in (AIRFLOW / "values.yaml").read_text()
    assert "images.airflow.tag=${VERSION}" in deploy
    assert "dags.gitSync.repo=${GIT_REPO_URL}" in deploy
    assert cd.count("GIT_REPO_URL: ${{ github.server_url }}/${{ github.repository }}.git") == 2
