"""Every Airflow pod as the chart would run it from our values (tests/deploy/chart_model.py):
the feedback database and the data sources reach each of them (finding 5), the sources are
buckets and no deployed setting points at a third-party URL (finding 6), task pods have no
Kubernetes API rights (finding 7), failed task pods are kept, and the scheduler keeps the
chart's probes with Airflow's health check on (finding 9)."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlparse

import pytest
from chart_model import (
    COMPONENTS,
    chart_pod_launcher_subjects,
    pod_environment,
    resolved,
    service_account,
)
from deploy_support import OVERLAYS, ROOT, find, load, load_all

from deploy.k8s_env import deep_merge

Objects = dict[str, list[dict[str, Any]]]
AIRFLOW = ROOT / "k8s" / "airflow"
SECRET_TEMPLATES = ROOT / "k8s" / "secrets" / "secrets.example.yaml"


def airflow_values(overlay: str) -> dict[str, Any]:
    return deep_merge(load(AIRFLOW / "values.yaml"), load(AIRFLOW / f"values-{overlay}.yaml"))


def secret_keys() -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d["stringData"]) for d in load_all(SECRET_TEMPLATES.read_text())
    }


def configmaps(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: {k: str(v) for k, v in (o.get("data") or {}).items()}
        for o in objs
        if o["kind"] == "ConfigMap"
    }


def environments(overlay: str, objs: list[dict[str, Any]], values: dict[str, Any] | None = None):
    values = airflow_values(overlay) if values is None else values
    maps, keys = configmaps(objs), secret_keys()
    return {c: pod_environment(values, c, maps, keys) for c in COMPONENTS}, maps


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finding_5_every_airflow_pod_gets_the_feedback_db_and_the_sources(
    rendered: Objects, overlay: str
) -> None:
    """Scheduler, dag-processor, triggerer, api-server and the task pods' template: the
    feedback DB URL from a Secret whose template has the key, the sources from the ConfigMap."""
    envs, maps = environments(overlay, rendered[overlay])
    keys = secret_keys()
    assert set(envs) == {"scheduler", "dag-processor", "triggerer", "api-server", "task"}
    for component, env in envs.items():
        db = env.get("DANDELION_FEEDBACK_DB_URL")
        assert db is not None, f"{overlay}/{component}: no DANDELION_FEEDBACK_DB_URL"
        assert db.secret and db.value is None, f"{component}: the URL must come from a Secret"
        assert db.secret[1] in keys[db.secret[0]], db.secret
        for name in ("DANDELION_SOURCE", "DANDELION_NEGATIVES_SOURCE"):
            assert name in env, f"{overlay}/{component}: no {name}"
            value = resolved(env[name], maps)
            assert value and value.startswith("s3://"), (overlay, component, name, value)
        # The store and the pipeline's own S3 credential reach them too.
        assert {"DANDELION_STORE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_finding_5_the_derivation_sees_a_missing_feedback_db(rendered: Objects) -> None:
    """Regression: with the pipeline's Secret as it was (S3 keys only), no pod gets the URL,
    and the library would fall back to an empty SQLite file in the pod."""
    values = airflow_values("dev")
    keys = secret_keys()
    keys["dandelion-pipeline-env"] = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    maps = configmaps(rendered["dev"])
    for component in COMPONENTS:
        assert "DANDELION_FEEDBACK_DB_URL" not in pod_environment(values, component, maps, keys)


def _default_source() -> str:
    text = (ROOT / "dandelion_lib" / "core" / "config.py").read_text()
    match = re.search(r'^DEFAULT_SOURCE\s*=\s*\(?\s*"([^"]+)"', text, re.M)
    assert match, "DEFAULT_SOURCE not found in dandelion_lib/core/config.py"
    return match.group(1)


def _third_party(url: str) -> bool:
    """An http(s) URL outside the cluster and the cloud's S3 endpoints."""
    host = urlparse(url).hostname or ""
    in_cluster = "." not in host or host.endswith(".svc") or host.endswith(".cluster.local")
    return not in_cluster and not host.endswith(".amazonaws.com") and host not in {"localhost"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finding_6_sources_are_buckets_and_no_deployed_default_is_third_party(
    rendered: Objects, overlay: str
) -> None:
    config = find(rendered[overlay], "ConfigMap", "dandelion-config")["data"]
    for name in ("DANDELION_SOURCE", "DANDELION_NEGATIVES_SOURCE"):
        assert re.fullmatch(r"s3://[a-z0-9.-]+/[\w./-]+", config[name]), (name, config[name])
    sources_bucket = config["DANDELION_SOURCE"].split("/")[2]
    assert sources_bucket != config["DANDELION_STORE_URL"].split("/")[2], "sources: own bucket"
    # Every URL a deployed environment carries: ConfigMaps and the Airflow values' literals.
    urls = [
        value
        for cm in configmaps(rendered[overlay]).values()
        for value in cm.values()
        if value.startswith(("http://", "https://"))
    ]
    envs, _ = environments(overlay, rendered[overlay])
    urls += [v.value for env in envs.values() for v in env.values() if v.value and "://" in v.value]
    assert urls, "no URL found: the scan is broken"
    third_party = [u for u in urls if _third_party(u)]
    assert not third_party, f"{overlay}: third-party URLs deployed: {third_party}"
    default = _default_source()
    assert _third_party(default), "the library's default is the third-party URL this guards"
    assert all(default not in u for u in urls)


def test_finding_6_the_url_check_can_fail() -> None:
    assert _third_party(_default_source())
    assert not _third_party("http://minio:9000")
    assert not _third_party("https://s3.eu-west-1.amazonaws.com")


def test_finding_7_task_pods_have_no_kubernetes_api_rights(rendered: Objects) -> None:
    """The chart's RBAC is off, so its pod-launcher binding (scheduler AND worker) is not
    rendered; our Role binds the launcher rights to the scheduler only, without pods/exec;
    task pods run as our ServiceAccount, which mounts no token and is bound to nothing."""
    for overlay in OVERLAYS:
        values = airflow_values(overlay)
        objs = rendered[overlay]
        assert chart_pod_launcher_subjects(values) == set()
        worker = service_account(values, "task")
        assert worker == "airflow-worker" and values["workers"]["serviceAccount"]["create"] is False
        sa = find(objs, "ServiceAccount", worker)
        assert sa["automountServiceAccountToken"] is False
        bindings = [o for o in objs if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}]
        subjects = {b["metadata"]["name"]: {s["name"] for s in b["subjects"]} for b in bindings}
        assert all(worker not in names for names in subjects.values()), subjects
        assert subjects["airflow-pod-launcher"] == {service_account(values, "scheduler")}
        assert subjects["airflow-pod-log-reader"] == {
            service_account(values, "api-server"), service_account(values, "triggerer")}  # fmt: skip
        launcher = find(objs, "Role", "airflow-pod-launcher")
        resources = {r for rule in launcher["rules"] for r in rule["resources"]}
        assert "pods" in resources and "pods/exec" not in resources and "secrets" not in resources
        verbs = {v for rule in launcher["rules"] for v in rule["verbs"]}
        assert "*" not in verbs and "create" in verbs


def test_finding_7_with_the_charts_rbac_task_pods_could_launch_pods() -> None:
    """Regression: the chart's own RBAC binds the worker ServiceAccount with KubernetesExecutor."""
    values = copy.deepcopy(airflow_values("prod"))
    values["rbac"]["create"] = True
    assert "airflow-worker" in chart_pod_launcher_subjects(values)


def test_failed_task_pods_are_kept_for_inspection() -> None:
    """`airflow kubernetes cleanup-pods` (the chart's cleanup CronJob) deletes failed pods too:
    it must be off while the executor keeps them."""
    values = load(AIRFLOW / "values.yaml")
    executor = values["config"]["kubernetes_executor"]
    if executor["delete_worker_pods_on_failure"] == "False":
        assert values["cleanup"]["enabled"] is False
    assert executor["delete_worker_pods"] == "True"


def test_finding_9_scheduler_health_check_on_and_chart_probes_kept() -> None:
    """The chart's probes run `/entrypoint airflow jobs check --job-type SchedulerJob --local`
    (the image honours that contract): no values override their command; Airflow's scheduler
    health check server is enabled with a threshold under the liveness window."""
    for overlay in OVERLAYS:
        values = airflow_values(overlay)
        for component in ("scheduler", "triggerer", "dagProcessor"):
            for probe in ("livenessProbe", "startupProbe"):
                assert "command" not in (values.get(component) or {}).get(probe, {}), component
        scheduler = values["config"]["scheduler"]
        assert scheduler["enable_health_check"] == "True"
        assert int(scheduler["scheduler_health_check_threshold"]) <= 60
