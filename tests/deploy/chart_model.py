"""What the official Airflow chart renders from our values, for the parts these checks need:
each Airflow pod's environment and the chart's RBAC bindings. The chart cannot be fetched or
rendered here (no Helm repository access), so both are reproduced from its templates
(apache/airflow, chart/; the pinned version is AIRFLOW_CHART_VERSION in k8s/deploy.sh):

- templates/_helpers.yaml, ``custom_airflow_environment``: every entry of ``env`` (name/value),
  every entry of ``secret`` (``valueFrom.secretKeyRef`` {secretName, secretKey}) and the
  ``extraEnv`` string (templated YAML list); ``custom_airflow_environment_from``: the
  ``extraEnvFrom`` string (templated YAML list of configMapRef/secretRef).
- templates/scheduler/scheduler-deployment.yaml, dag-processor/dag-processor-deployment.yaml,
  triggerer/triggerer-deployment.yaml, api-server/api-server-deployment.yaml: the main
  container includes both helpers plus ``container_extra_envs`` of ``<component>.env``.
- files/pod-template-file.kubernetes-helm-yaml (KubernetesExecutor task pods): the same two
  helpers plus ``container_extra_envs`` of ``workers.env``; its serviceAccountName is
  ``worker.serviceAccountName`` (``workers.serviceAccount.name`` when set).
- templates/rbac/pod-launcher-rolebinding.yaml: rendered when ``rbac.create`` and
  ``allowPodLaunching``; with KubernetesExecutor its subjects are the scheduler's and the
  worker's ServiceAccounts (the Role grants pods create/delete/patch and pods/exec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

RELEASE = "airflow"
# values key of each long-running component, and the task pods' (the pod template's) key
COMPONENTS = {
    "scheduler": "scheduler",
    "dag-processor": "dagProcessor",
    "triggerer": "triggerer",
    "api-server": "apiServer",
    "task": "workers",
}


@dataclass(frozen=True)
class EnvVar:
    """One variable of a container: a literal, a key of a Secret or ConfigMap."""

    name: str
    value: str | None = None
    secret: tuple[str, str] | None = None  # (Secret name, key)
    configmap: tuple[str, str] | None = None  # (ConfigMap name, key)


def _entries(text: Any) -> list[dict[str, Any]]:
    """The chart passes extraEnv/extraEnvFrom through `tpl` then reads them as YAML lists."""
    if not text:
        return []
    if "{{" in str(text):
        raise ValueError(f"template not reproduced here: {text!r}")
    return list(yaml.safe_load(text) or [])


def _from_env_entry(entry: dict[str, Any]) -> EnvVar:
    ref = entry.get("valueFrom", {})
    if "secretKeyRef" in ref:
        key_ref = ref["secretKeyRef"]
        return EnvVar(entry["name"], secret=(key_ref["name"], key_ref["key"]))
    if "configMapKeyRef" in ref:
        key_ref = ref["configMapKeyRef"]
        return EnvVar(entry["name"], configmap=(key_ref["name"], key_ref["key"]))
    return EnvVar(entry["name"], value=str(entry.get("value", "")))


def pod_environment(
    values: dict[str, Any],
    component: str,
    configmaps: dict[str, dict[str, str]],
    secret_keys: dict[str, set[str]],
) -> dict[str, EnvVar]:
    """Variables of the component's Airflow container (later entries win, as in a pod spec).

    `configmaps` are the rendered overlay's ConfigMaps (envFrom copies their keys) and
    `secret_keys` the keys of each Secret template (envFrom copies every key)."""
    env: dict[str, EnvVar] = {}
    for ref in _entries(values.get("extraEnvFrom")):
        if "configMapRef" in ref:
            name = ref["configMapRef"]["name"]
            for key in configmaps[name]:
                env[key] = EnvVar(key, configmap=(name, key))
        elif "secretRef" in ref:
            name = ref["secretRef"]["name"]
            for key in sorted(secret_keys[name]):
                env[key] = EnvVar(key, secret=(name, key))
    for entry in values.get("env") or []:
        env[entry["name"]] = _from_env_entry(entry)
    for item in values.get("secret") or []:
        env[item["envName"]] = EnvVar(
            item["envName"], secret=(item["secretName"], item["secretKey"])
        )
    for entry in _entries(values.get("extraEnv")):
        env[entry["name"]] = _from_env_entry(entry)
    for entry in (values.get(COMPONENTS[component]) or {}).get("env") or []:
        env[entry["name"]] = _from_env_entry(entry)
    return env


def resolved(var: EnvVar, configmaps: dict[str, dict[str, str]]) -> str | None:
    """A variable's value where the files say it (literal or ConfigMap); None for a Secret."""
    if var.configmap:
        name, key = var.configmap
        return configmaps[name][key]
    return var.value


def service_account(values: dict[str, Any], component: str) -> str:
    """The chart's `<component>.serviceAccountName` helper: the given name, else
    `<release>-<component>` when the chart creates it, else `default`."""
    sa = (values.get(COMPONENTS[component]) or {}).get("serviceAccount") or {}
    suffix = "worker" if component == "task" else component
    if sa.get("name"):
        return str(sa["name"])
    return f"{RELEASE}-{suffix}" if sa.get("create", True) else "default"


def chart_pod_launcher_subjects(values: dict[str, Any]) -> set[str]:
    """ServiceAccounts the chart's pod-launcher RoleBinding binds (none when not rendered)."""
    rbac = values.get("rbac") or {}
    if not (rbac.get("create", True) and values.get("allowPodLaunching", True)):
        return set()
    executor = values.get("executor", "CeleryExecutor")
    subjects = set()
    if executor in {"LocalExecutor", "LocalKubernetesExecutor", "KubernetesExecutor",
                    "CeleryKubernetesExecutor"}:  # fmt: skip
        subjects.add(service_account(values, "scheduler"))
    if executor in {"CeleryExecutor", "LocalKubernetesExecutor", "KubernetesExecutor",
                    "CeleryKubernetesExecutor"}:  # fmt: skip
        subjects.add(service_account(values, "task"))
    return subjects
