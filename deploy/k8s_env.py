"""What the official Airflow chart gives each Airflow container, derived from our values files
(`k8s/airflow/values.yaml` + `values-<overlay>.yaml`) and the rendered overlay's ConfigMap, so
that the container check of the pipeline image (tests/images) cannot drift from Kubernetes.

Only the parts that decide whether the image runs are derived: executor, `config:` sections
(rendered to the airflow.cfg the chart mounts), `env:`, `extraEnvFrom` ConfigMaps, the chart's
secret-backed variables (`secret:` and the named secrets, given test values here), uid/gid,
read-only root filesystem, and the emptyDir volumes (run as tmpfs) with their mount paths.
"""

from __future__ import annotations

import configparser
import io
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The Kubernetes tree the container is derived from (another checkout's k8s/ to try its values).
K8S = Path(os.environ.get("DANDELION_K8S_DIR", ROOT / "k8s")).resolve()
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
# Where the chart mounts the rendered config, and the logs emptyDir (logs.persistence off).
AIRFLOW_CFG = "/opt/airflow/airflow.cfg"
LOGS_DIR = "/opt/airflow/logs"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(overlay: str = "dev") -> dict[str, Any]:
    """values.yaml merged with values-<overlay>.yaml, as `helm -f values.yaml -f ...` does."""
    folder = K8S / "airflow"
    values: dict[str, Any] = yaml.safe_load((folder / "values.yaml").read_text()) or {}
    extra = folder / f"values-{overlay}.yaml"
    if extra.exists():
        values = deep_merge(values, yaml.safe_load(extra.read_text()) or {})
    return values


def overlay_configmaps(overlay: str = "dev") -> dict[str, dict[str, str]]:
    """ConfigMaps of the rendered overlay (kubectl kustomize), by name."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    maps: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(rendered):
        if doc and doc.get("kind") == "ConfigMap":
            maps[doc["metadata"]["name"]] = {k: str(v) for k, v in (doc.get("data") or {}).items()}
    return maps


@dataclass
class AirflowContainer:
    """How the chart runs an Airflow container of the pipeline image."""

    env: dict[str, str]
    airflow_cfg: str
    uid: int
    gid: int
    read_only: bool
    tmpfs: list[str] = field(default_factory=list)
    secret_env_from: list[str] = field(default_factory=list)
    dags_folder: str = ""

    def docker_args(self) -> list[str]:
        args = ["--user", f"{self.uid}:{self.gid}"]
        if self.read_only:
            args.append("--read-only")
        args += ["--security-opt", "no-new-privileges:true", "--cap-drop", "ALL"]
        for path in self.tmpfs:
            args += ["--tmpfs", f"{path}:uid={self.uid},gid={self.gid},mode=0775"]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        return args


def _render_cfg(config: dict[str, Any]) -> str:
    parser = configparser.ConfigParser(interpolation=None)
    for section, items in config.items():
        parser[section] = {
            k: str(v) for k, v in (items or {}).items() if "{{" not in str(v)
        }  # chart templates ({{ ... }}) are rendered by helm; none is needed here
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def _empty_dir_mounts(values: dict[str, Any]) -> list[str]:
    """Mount paths of the emptyDir volumes the values declare (top level and per component)."""
    paths: list[str] = []
    scopes = [values] + [
        values.get(c) or {}
        for c in ("scheduler", "apiServer", "dagProcessor", "triggerer", "workers")
    ]
    for scope in scopes:
        vols = {v["name"]: v for v in scope.get("volumes", []) + scope.get("extraVolumes", [])}
        mounts = scope.get("volumeMounts", []) + scope.get("extraVolumeMounts", [])
        for mount in mounts:
            vol = vols.get(mount["name"]) or {v["name"]: v for v in values.get("volumes", [])}.get(
                mount["name"], {}
            )
            if "emptyDir" in vol and mount["mountPath"] not in paths:
                paths.append(mount["mountPath"])
    return paths


def airflow_container(
    secrets: dict[str, str],
    overlay: str = "dev",
    configmaps: dict[str, dict[str, str]] | None = None,
) -> AirflowContainer:
    """The container the chart would run. `secrets` gives the values of the pre-created secrets
    by the env var they become (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, AIRFLOW__CORE__FERNET_KEY,
    AIRFLOW__API__SECRET_KEY, AIRFLOW__API_AUTH__JWT_SECRET, ..., and the keys of secretRefs)."""
    values = load_values(overlay)
    config: dict[str, Any] = {k: dict(v or {}) for k, v in (values.get("config") or {}).items()}
    core = config.setdefault("core", {})
    # The chart writes executor from the top-level value; its default auth manager is FAB.
    core["executor"] = values["executor"]
    core.setdefault("auth_manager", FAB_AUTH_MANAGER)
    env: dict[str, str] = {}
    configmaps = overlay_configmaps(overlay) if configmaps is None else configmaps
    secret_refs: list[str] = []
    for ref in yaml.safe_load(values.get("extraEnvFrom") or "[]") or []:
        if "configMapRef" in ref:
            env.update(configmaps[ref["configMapRef"]["name"]])
        elif "secretRef" in ref:
            secret_refs.append(ref["secretRef"]["name"])
    for item in values.get("env") or []:
        env[item["name"]] = str(item["value"])
    for item in values.get("secret") or []:
        env[item["envName"]] = secrets[item["envName"]]
    # Variables the chart sets from its named secrets (data.metadataSecretName etc.).
    for var in (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
    ):
        env[var] = secrets[var]
    for key, value in secrets.items():
        if not key.startswith("AIRFLOW__"):
            env.setdefault(key, value)  # the keys of the extraEnvFrom secretRefs
    env["AIRFLOW_HOME"] = "/opt/airflow"
    env["AIRFLOW_CONFIG"] = AIRFLOW_CFG
    dags_folder = str(core.get("dags_folder", "/opt/dandelion/dags"))
    core["dags_folder"] = dags_folder
    contexts = values.get("securityContexts") or {}
    ctx = contexts.get("containers") or contexts.get("container") or {}  # chart: `containers`
    pod = contexts.get("pod") or {}
    tmpfs = _empty_dir_mounts(values)
    if LOGS_DIR not in tmpfs:
        tmpfs.append(LOGS_DIR)
    return AirflowContainer(
        env=env,
        airflow_cfg=_render_cfg(config),
        uid=int(pod.get("runAsUser", values.get("uid", 50000))),
        gid=int(values.get("gid", 0)),
        read_only=bool(ctx.get("readOnlyRootFilesystem", False)),
        tmpfs=tmpfs,
        secret_env_from=secret_refs,
        dags_folder=dags_folder,
    )
