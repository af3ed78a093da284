"""compose.yaml: valid for Docker Compose and the compose-spec schema, health-gated, no secrets."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_support import ROOT, load, run, tool

COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
ONE_SHOT = {"minio-init", "airflow-init"}
EXPECTED_SERVICES = {
    "minio", "minio-init", "postgres", "mlflow", "airflow-init", "airflow-apiserver",
    "airflow-scheduler", "airflow-dag-processor", "statsd-exporter", "api", "app",
    "prometheus", "grafana",
}  # fmt: skip
OPTIONAL = {"review": "review"}  # service -> the compose profile that starts it


def compose(*args: str) -> Any:
    return run(tool("docker-compose"), "--project-directory", str(ROOT), "-f", str(COMPOSE), *args)


def resolved(*profiles: str) -> dict[str, Any]:
    """The model Docker Compose itself resolves (interpolated with .env.example), with these
    profiles active."""
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    proc = compose("--env-file", str(ENV_EXAMPLE), *flags, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """Every service, those of optional profiles included: the checks below cover them all."""
    return resolved("*")


@pytest.fixture(scope="module")
def default_config() -> dict[str, Any]:
    """What `docker compose up` starts (no profile)."""
    return resolved()


def test_docker_compose_accepts_the_file() -> None:
    proc = compose("--env-file", str(ENV_EXAMPLE), "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_compose_spec_schema() -> None:
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_whole_stack_is_there(config: dict[str, Any], default_config: dict[str, Any]) -> None:
    assert set(default_config["services"]) == EXPECTED_SERVICES
    assert set(config["services"]) == EXPECTED_SERVICES | set(OPTIONAL)
    for name, profile in OPTIONAL.items():
        assert config["services"][name]["profiles"] == [profile], name
        assert set(resolved(profile)["services"]) == EXPECTED_SERVICES | {name}


def test_missing_secrets_stop_compose_with_a_message(tmp_path) -> None:
    """Every secret is required from .env: without one, compose refuses and names it."""
    env = tmp_path / "partial.env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env.write_text("\n".join(line for line in lines if not line.startswith("POSTGRES_PASSWORD=")))
    proc = compose("--env-file", str(env), "config", "--quiet")
    assert proc.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in proc.stderr


def test_missing_review_token_stops_compose_with_a_message(tmp_path) -> None:
    """The reviewer page's token has no default in the file: without it compose refuses (also
    with the `review` profile off: it interpolates every service) and names the variable."""
    env = tmp_path / "partial.env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env.write_text("\n".join(line for line in lines if not line.startswith("REVIEW_TOKEN=")))
    for profiles in ((), ("--profile", "review")):
        proc = compose("--env-file", str(env), *profiles, "config", "--quiet")
        assert proc.returncode != 0
        assert "set REVIEW_TOKEN in .env" in proc.stderr


def test_every_required_variable_is_in_env_example() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    defined = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert required, "compose.yaml should require its secrets with ${VAR:?message}"
    assert required <= defined, f"missing from .env.example: {sorted(required - defined)}"


def test_no_hard_coded_secrets() -> None:
    """Every credential-like value in compose.yaml is interpolated from the environment."""
    raw = load(COMPOSE)
    offenders = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                key_path = f"{path}.{key}"
                secret_like = re.search(r"PASSWORD|SECRET|TOKEN|FERNET|ACCESS_KEY", str(key), re.I)
                if secret_like and isinstance(value, str) and "${" not in value:
                    offenders.append(key_path)
                walk(value, key_path)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(raw, "")
    assert not offenders, offenders
    for url in re.findall(r"\w+(?:\+\w+)?://[^\s\"']+", COMPOSE.read_text()):
        if "@" in url:  # credentials inside a connection URL must be interpolated too
            assert re.search(r"://\w+:\$\{\w+:\?", url), url


def test_start_order_is_health_gated(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services
            condition = spec["condition"]
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                assert "healthcheck" in services[dep], f"{dep} gates {name} but has no healthcheck"
    # The chain the platform relies on.
    assert "minio-init" in services["api"]["depends_on"]
    assert "mlflow" in services["api"]["depends_on"]
    assert "postgres" in services["mlflow"]["depends_on"]
    assert "api" in services["app"]["depends_on"]
    assert "prometheus" in services["grafana"]["depends_on"]


def test_long_running_services_have_healthchecks(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        if name in ONE_SHOT:
            continue
        has_check = "healthcheck" in service and not service["healthcheck"].get("disable")
        # The pipeline image's own HEALTHCHECK covers scheduler and dag-processor.
        image_check = service.get("build", {}).get("dockerfile", "").endswith("pipeline.Dockerfile")
        assert has_check or image_check, f"{name} has no healthcheck"


def test_images_are_pinned(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1], f"{name}: image without a tag: {image}"
        assert not image.endswith(":latest"), f"{name}: {image}"


def test_ports_are_published_on_loopback_only(config: dict[str, Any]) -> None:
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_monitoring_configuration_is_mounted(config: dict[str, Any]) -> None:
    services = config["services"]
    prometheus = services["prometheus"]
    assert "--config.file=/etc/dandelion/monitoring/prometheus.yml" in prometheus["command"]
    sources = {
        str(v["source"]).replace(str(ROOT), ".")
        for v in prometheus["volumes"] + services["grafana"]["volumes"]
    }
    assert {"./monitoring", "./monitoring/grafana/provisioning"} <= sources


def test_api_settings_point_at_the_stack(config: dict[str, Any]) -> None:
    env = config["services"]["api"]["environment"]
    assert env["DANDELION_TRACKING_URI"] == "http://mlflow:5000"
    assert env["DANDELION_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["DANDELION_STORE_URL"].startswith("s3://")
    assert env["DANDELION_FEEDBACK_DB_URL"].startswith("postgresql+psycopg://")
    assert env["DANDELION_API_HOST"] == "0.0.0.0"
    assert config["services"]["app"]["environment"]["DANDELION_API_URL"] == "http://api:8000"


def test_airflow_services_see_the_feedback_loop(config: dict[str, Any]) -> None:
    """Every Airflow service (tasks run in the scheduler under LocalExecutor; the dag-processor
    parses with the same settings) reads the feedback database the API writes and the same
    store: without it, dandelion_feedback counts an empty SQLite file and never fires."""
    services = config["services"]
    api = services["api"]["environment"]
    airflow = [
        n for n, s in services.items() if s.get("image") == services["airflow-scheduler"]["image"]
    ]
    assert {"airflow-scheduler", "airflow-dag-processor", "airflow-apiserver"} <= set(airflow)
    for name in airflow:
        env = services[name]["environment"]
        for key in (
            "DANDELION_FEEDBACK_DB_URL",
            "DANDELION_STORE_URL",
            "DANDELION_S3_ENDPOINT_URL",
        ):
            assert env.get(key) == api[key], (name, key)


def test_a_stale_scheduler_is_restarted(config: dict[str, Any]) -> None:
    """Docker never restarts an "unhealthy" container: the scheduler's probe ends its processes
    after repeated 503s of Airflow's scheduler health check (stale heartbeat), its init process
    then exits and the restart policy starts it again (docker/healthcheck.py)."""
    sched = config["services"]["airflow-scheduler"]
    env = sched["environment"]
    assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert env["PYTHONFAULTHANDLER"] == "1"  # the stacks reach the log first
    assert sched["init"] is True
    assert sched["restart"] in ("always", "unless-stopped")
    test = sched["healthcheck"]["test"]
    assert "--restart-after" in test and test[-1] == "http://127.0.0.1:8974/health"
    # the rest of the Airflow environment is still there (a mapping merge, not a replacement)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")


def test_reviewer_page_service(config: dict[str, Any]) -> None:
    """The reviewer page: the app's image and hardening, `dashboards.serve --review` bound to
    0.0.0.0 inside the container, port 8867 published on the host's loopback only, the token from
    .env, the same feedback database and store settings as the API, the API's address for the
    maps of where the model looked."""
    services = config["services"]
    review, app, api = services["review"], services["app"], services["api"]
    assert review["image"] == app["image"]
    assert review["build"]["dockerfile"] == app["build"]["dockerfile"] == "docker/app.Dockerfile"
    assert review["command"] == ["python", "-m", "dashboards.serve", "--review"]
    for key in ("read_only", "cap_drop", "security_opt", "restart"):
        assert review[key] == app[key], key
    assert review["read_only"] is True and review["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in review["security_opt"]
    assert "user" not in review or not str(review["user"]).startswith(("0", "root"))
    assert [t.split(":")[0] for t in review["tmpfs"]] == ["/tmp"]
    # Published on 127.0.0.1 only; inside the container the page listens on every interface.
    assert [(p["host_ip"], str(p["published"]), p["target"]) for p in review["ports"]] == [
        ("127.0.0.1", "8867", 8867)
    ]
    env = review["environment"]
    assert env["DANDELION_REVIEW_HOST"] == "0.0.0.0"
    assert env["DANDELION_REVIEW_PORT"] == "8867"
    assert env["DANDELION_REVIEW_TOKEN"] == "change-me-review-token"  # from .env.example
    for key in ("DANDELION_FEEDBACK_DB_URL", "DANDELION_STORE_URL", "DANDELION_S3_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):  # fmt: skip
        assert env[key] == api["environment"][key], key
    assert env["DANDELION_API_URL"] == app["environment"]["DANDELION_API_URL"] == "http://api:8000"
    assert review["healthcheck"]["test"][-1] == "http://127.0.0.1:8867/health/live"
    assert {"postgres", "minio-init"} <= set(review["depends_on"])
    assert review["deploy"]["resources"]["limits"]["memory"]


def test_review_token_is_never_a_value_in_the_repository() -> None:
    """No token value in git: compose interpolates it (no default), .env.example holds a
    placeholder, the image sets none."""
    raw = load(COMPOSE)["services"]["review"]["environment"]
    assert raw["DANDELION_REVIEW_TOKEN"].startswith("${REVIEW_TOKEN:?")
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line[:1].isupper()
    )
    assert example["REVIEW_TOKEN"].startswith("change-me")
    assert "REVIEW_TOKEN" not in (ROOT / "docker" / "app.Dockerfile").read_text()
