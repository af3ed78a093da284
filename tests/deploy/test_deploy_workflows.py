"""GitHub Actions workflows: schema-valid, zizmor clean, pinned, least privilege, same sessions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploy_support import OVERLAYS, ROOT, load, run, tool

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
    assert len(files) == 3
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_offline_pedantic() -> None:
    proc = run(tool("zizmor"), "--offline", "--persona", "pedantic", str(WORKFLOWS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["ci.yml", "cd.yml", "kind.yml"])
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
    for session in ("lint", "tests", "faults", "slow", "deploy_check"):
        assert f"nox -s {session}" in commands, session


def test_ci_gives_the_suites_their_datasets() -> None:
    """GitHub has no shared copies of the datasets the suites read (tests/conftest.py): each
    suite's job fetches them over HTTP first and points the tests at them."""
    jobs = workflow("ci.yml")["jobs"]
    for name in ("tests", "slow", "faults"):
        job_steps = jobs[name]["steps"]
        runs = [s.get("run", "") for s in job_steps]
        fetch = [i for i, r in enumerate(runs) if "scripts/fetch-test-datasets.py" in r]
        suite = runs.index(f"nox -s {name}")
        assert len(fetch) == 1 and fetch[0] < suite, name
        dest = runs[fetch[0]].split()[-1].strip('"').replace("$RUNNER_TEMP", "${{ runner.temp }}")
        assert job_steps[suite]["env"] == {
            "DANDELION_TEST_DATASET": f"{dest}/greenr",
            "DANDELION_OOD_DATASET": f"{dest}/ood-dev",
        }
    assert (ROOT / "scripts" / "fetch-test-datasets.py").is_file()


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
    guard = ("refusing to deploy a :latest", "grep -q ':latest'")
    lines = [line for line in text.splitlines() if not any(g in line for g in guard)]
    assert not [line for line in lines if ":latest" in line]


def test_repository_ci_script_runs_deploy_check() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "nox -s deploy_check" in lines


DEPLOY = ROOT / "k8s" / "deploy.sh"


def budget(name: str) -> int:
    """A variable of deploy.sh's timeout block, computed by bash from the script's own text."""
    text = DEPLOY.read_text()
    block = text[
        text.index("# Bounds of each waiting step") : text.index("# Which rendered objects")
    ]
    proc = run("bash", "-c", block + f'\necho "${name}"')
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def worst_case_seconds() -> int:
    return budget("WORST_CASE_S")


def test_finding_5_jobs_give_up_before_deploy_sh_stops_waiting() -> None:
    """A Job's own deadline is inside the wait deploy.sh gives it, so a stuck Job fails as
    itself (with its logs) rather than as a wait timeout."""
    jobs = {
        "MLFLOW_SCHEMA_TIMEOUT_S": ROOT / "k8s" / "base" / "mlflow" / "db-upgrade-job.yaml",
        "ADMIN_TIMEOUT_S": ROOT / "k8s" / "airflow" / "admin-user" / "job.yaml",
        "AIRFLOW_MIGRATE_TIMEOUT_S": ROOT / "k8s" / "airflow" / "migrate-db" / "job.yaml",
    }
    for variable, path in jobs.items():
        assert load(path)["spec"]["activeDeadlineSeconds"] < budget(variable), path.name


def test_finding_5_job_timeouts_cover_the_scripts_worst_case() -> None:
    text = DEPLOY.read_text()
    worst = worst_case_seconds()
    assert worst >= 3600, "the first pipeline run alone is bounded by an hour"
    # Every wait is bounded by one of the budget's variables, none by a literal duration.
    waits = re.findall(r"--timeout[= ]\"?(\S+?)\"?(?:\s|$)", text)
    assert waits and all(re.fullmatch(r"\$\{[A-Z_]+_TIMEOUT_S\}s?", w) for w in waits), waits
    for name in re.findall(r"\$\{([A-Z_]+_TIMEOUT_S)\}", text):
        assert re.search(rf"\b{name}\b", text[: text.index("WORST_CASE_S=")]), name
        assert name in text[text.index("WORST_CASE_S=") : text.index("# Which rendered objects")]
    cd = workflow("cd.yml")["jobs"]
    for job in ("deploy-dev", "deploy-prod"):
        assert cd[job]["timeout-minutes"] * 60 >= worst + 300, (job, worst)
    kind = workflow("kind.yml")["jobs"]["kind"]
    assert kind["timeout-minutes"] * 60 >= worst + 1800, "room for the image builds"


def test_finding_5_bootstrap_order_has_no_cycle() -> None:
    """secrets -> data services -> MLflow schema -> MLflow -> Airflow -> champion -> API/app:
    the API (ready only with a champion) is applied and awaited after the pipeline's first run,
    which needs Airflow, which needs only the data services and MLflow."""
    text = DEPLOY.read_text()
    order = [
        "create-dev-secrets.sh",
        "missing secrets",
        '-l "$STAGE_FOUNDATION"',
        'rollout status "$sts"',
        '-l "$STAGE_MLFLOW_SCHEMA"',
        "job/mlflow-db-upgrade",
        '-l "$STAGE_MLFLOW"',
        "rollout status deployment/mlflow",
        "job/airflow-migrate-db",
        "helm upgrade --install",
        "job/airflow-admin-user",
        "if has_champion",
        "dags trigger",
        '-l "$STAGE_SERVING"',
        "rollout status deployment/api",
        "rollout status deployment/app",
        "rollout status deployment/review",
    ]
    positions = [text.index(marker, text.index("# --- 1. secrets")) for marker in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    assert text.count("rollout status deployment/api") == 1


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    key, op, rest = re.fullmatch(r"(\S+?)\s*(notin|in|=)\s*(.+)", selector).groups()  # type: ignore[union-attr]
    values = {v.strip() for v in rest.strip("()").split(",")}
    if op == "=":
        return labels.get(key) in values
    if op == "in":
        return labels.get(key) in values
    return labels.get(key) not in values  # notin: also objects without the key


def test_deploy_stages_apply_every_rendered_object_exactly_once(rendered: dict) -> None:
    stages = dict(re.findall(r"^(STAGE_[A-Z_]+)='([^']+)'$", DEPLOY.read_text(), re.M))
    assert set(stages) == {
        "STAGE_FOUNDATION",
        "STAGE_MLFLOW_SCHEMA",
        "STAGE_MLFLOW",
        "STAGE_SERVING",
    }
    for overlay in OVERLAYS:
        for obj in rendered[overlay]:
            labels = obj["metadata"].get("labels", {})
            hits = [name for name, sel in stages.items() if _selector_matches(sel, labels)]
            assert len(hits) == 1, (overlay, obj["kind"], obj["metadata"]["name"], hits)
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] in {"api", "app", "review"}:
                assert hits == ["STAGE_SERVING"]


def test_kind_job_rehearses_cd_from_an_empty_cluster() -> None:
    """It cannot run here (no Docker registry access, no cluster): validated statically."""
    data = workflow("kind.yml")
    job = data["jobs"]["kind"]
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "kind create cluster" in runs and "kind delete cluster" in runs
    assert 'docker build --file "docker/${image}.Dockerfile"' in runs
    assert "for image in api app mlflow pipeline" in runs
    assert "bash k8s/deploy.sh" in runs
    assert "/predict" in runs and "port-forward svc/api" in runs
    (deploy_step,) = [s for s in job["steps"] if s.get("run", "").endswith("bash k8s/deploy.sh\n")]
    assert deploy_step["env"]["OVERLAY"] == "dev"
    assert "stripped-down-crds.yaml" in runs, "ServiceMonitor/PrometheusRule need their CRDs"
    assert (
        data["env"]["AIRFLOW_CHART_VERSION"] == workflow("cd.yml")["env"]["AIRFLOW_CHART_VERSION"]
    )
