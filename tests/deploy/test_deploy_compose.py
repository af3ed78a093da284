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


def compose(*args: str) -> Any:
    return run(tool("docker-compose"), "--project-directory", str(ROOT), "-f", str(COMPOSE), *args)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The model Docker Compose itself resolves (interpolated with .env.example)."""
    proc = compose("--env-file", str(ENV_EXAMPLE), "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_docker_compose_accepts_the_file() -> None:
    proc = compose("--env-file", str(ENV_EXAMPLE), "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_compose_spec_schema() -> None:
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_whole_stack_is_there(config: dict[str, Any]) -> None:
    assert set(config["services"]) == EXPECTED_SERVICES


def test_missing_secrets_stop_compose_with_a_message(tmp_path) -> None:
    """Every secret is required from .env: without one, compose refuses and names it."""
    env = tmp_path / "partial.env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env.write_text("\n".join(line for line in lines if not line.startswith("POSTGRES_PASSWORD=")))
    proc = compose("--env-file", str(env), "config", "--quiet")
    assert proc.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in proc.stderr


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
