"""GitHub Actions workflows: schema-valid, zizmor clean, pinned, least privilege, same sessions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploy_support import ROOT, load, run, tool

WORKFLOWS = ROOT / ".github" / "workflows"
SHA_PIN = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def workflow(name: str) -> dict[str, Any]:
    data = load(WORKFLOWS / name)
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for job in data["jobs"].values() for s in job.get("steps", [])]


def test_github_workflow_schema() -> None:
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) == 2
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_offline_pedantic() -> None:
    proc = run(tool("zizmor"), "--offline", "--persona", "pedantic", str(WORKFLOWS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["ci.yml", "cd.yml"])
def test_actions_pinned_by_commit_and_least_privilege(name: str) -> None:
    data = workflow(name)
    assert data["permissions"] == {}, "no default token permissions"
    for job_name, job in data["jobs"].items():
        assert "permissions" in job, f"{job_name}: explicit permissions"
        assert "timeout-minutes" in job, f"{job_name}: bounded run time"
        for grant, level in job["permissions"].items():
            if level == "write":
                assert (name, job_name, grant) == ("cd.yml", "images", "packages"), grant
    for step in steps(data):
        if "uses" in step:
            assert SHA_PIN.match(step["uses"]), step["uses"]
            if step["uses"].startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


def test_ci_runs_the_local_nox_sessions() -> None:
    data = workflow("ci.yml")
    assert set(data["on"]) == {"push", "pull_request"}
    commands = [s["run"] for s in steps(data) if "run" in s]
    for session in ("lint", "tests", "slow", "deploy_check"):
        assert f"nox -s {session}" in commands, session


def test_cd_builds_tagged_images_then_dev_then_protected_prod() -> None:
    data = workflow("cd.yml")
    assert set(data["on"]) == {"push"} and set(data["on"]["push"]) == {"tags"}
    jobs = data["jobs"]
    build = "\n".join(s.get("run", "") for s in jobs["images"]["steps"])
    for image in ("api", "app", "mlflow", "pipeline"):
        assert image in build
    assert '--tag "${ref}:${GITHUB_SHA}" --tag "${ref}:${VERSION}"' in build
    assert "ghcr.io" in (WORKFLOWS / "cd.yml").read_text()
    assert jobs["deploy-dev"]["needs"] == "images"
    assert set(jobs["deploy-prod"]["needs"]) == {"images", "deploy-dev"}
    assert jobs["deploy-prod"]["environment"] == "production"
    for job in ("deploy-dev", "deploy-prod"):
        env = jobs[job]["steps"][-1]["env"]
        assert env["OVERLAY"] in {"dev", "prod"}
    # No image reference to :latest anywhere (deploy.sh's own guard against it aside).
    text = (WORKFLOWS / "cd.yml").read_text() + (ROOT / "k8s" / "deploy.sh").read_text()
    lines = [line for line in text.splitlines() if "refusing to deploy a :latest" not in line]
    assert not [line for line in lines if ":latest" in line]


def test_repository_ci_script_runs_deploy_check() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "nox -s deploy_check" in lines
