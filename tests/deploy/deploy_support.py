"""Helpers shared by the deployment checks: paths, the validators, rendered objects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(sys.executable).parent
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version every rendered object is validated against (docs/deployment.md)."""

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
PROJECT_IMAGES = ("api", "app", "mlflow", "pipeline")


def tool(name: str) -> str:
    """Path of a validator installed in this virtualenv (or on PATH, e.g. kubectl)."""
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run the checks with `nox -s deploy_check`")
    return found


def run(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a validator; the caller asserts on returncode and output."""
    return subprocess.run(
        list(args),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def load_all(text: str) -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


def load(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def render(overlay: str) -> str:
    proc = run(tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay))
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return proc.stdout


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template (metadata and spec) of a workload, a CronJob's included."""
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = pod_template(obj)["spec"]
    return spec


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = pod_template(obj)["metadata"]["labels"]
    return labels


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """All containers (init containers included) of a workload object."""
    pod = pod_spec(obj)
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]
