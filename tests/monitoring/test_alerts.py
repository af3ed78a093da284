"""Prometheus configuration and alert rules: promtool clean, every alert unit-tested both
ways, thresholds and names consistent with settings, scrape jobs and the runbook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from monitoring_support import DOC, MONITORING, alert_rules, base_name, catalogue, metric_names

from api.metrics import ApiMetrics
from dandelion_lib.core.config import Settings


def _promtool(promtool: str, *args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_config(promtool: str) -> None:
    proc = _promtool(promtool, "check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: prometheus.yml is valid" in proc.stdout + proc.stderr


def test_promtool_check_rules(promtool: str) -> None:
    proc = _promtool(promtool, "check", "rules", "alerts.yml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"SUCCESS: {len(alert_rules())} rules found" in out
    assert "WARNING" not in out.upper()


TEST_FILES = ("alerts_test.yml", "alerts_test_days.yml")


def _test_files() -> dict[str, dict]:
    return {name: yaml.safe_load((MONITORING / name).read_text()) for name in TEST_FILES}


def test_promtool_unit_tests_pass(promtool: str) -> None:
    proc = _promtool(promtool, "test", "rules", *TEST_FILES)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("SUCCESS") == len(TEST_FILES)


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = [case for doc in _test_files().values() for case in doc["tests"]]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert len(names) >= 9
    assert names - fires == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"
    assert (fires | quiet) <= names, "tests of alerts that do not exist"


def test_the_unit_tests_catch_a_missing_alert(promtool: str, tmp_path: Path) -> None:
    """Mutation check: with any one alert removed, its own unit tests fail."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for name in (r["alert"] for r in alert_rules()):
        mutated = {
            "groups": [
                {**g, "rules": [r for r in g["rules"] if r.get("alert") != name]}
                for g in rules["groups"]
            ]
        }
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(mutated, sort_keys=False))
        files = []
        for file_name, doc in _test_files().items():
            cases = [
                {
                    **case,
                    "alert_rule_test": [
                        c for c in case["alert_rule_test"] if c["alertname"] == name
                    ],
                }
                for case in doc["tests"]
                if any(c["alertname"] == name for c in case.get("alert_rule_test", []))
            ]
            if cases:
                (tmp_path / file_name).write_text(yaml.safe_dump({**doc, "tests": cases}))
                files.append(file_name)
        proc = _promtool(promtool, "test", "rules", *files, cwd=tmp_path)
        assert proc.returncode != 0, f"no test fails when {name} is removed"
        assert name in proc.stdout + proc.stderr


def test_required_alerts_exist() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    required = {
        "DandelionApiDown": "up{",
        "DandelionNoModelLoaded": "dandelion_model_loaded",
        "DandelionHighErrorRate": 'status=~"5.."',
        "DandelionHighLatencyP95": "histogram_quantile(0.95",
        "DandelionQueueSaturated": "dandelion_queue_rejections_total",
        "DandelionDataDrift": "dandelion_drift_share",
        "DandelionLiveAccuracyLow": "dandelion_live_accuracy",
        "DandelionDagRunFailed": 'state="failed"',
        "DandelionNoSuccessfulTraining": 'state="success"',
    }
    for name, fragment in required.items():
        assert fragment in exprs[name], name
    assert "> 0.5" in exprs["DandelionHighLatencyP95"]  # 500 ms


def test_thresholds_mirror_the_settings() -> None:
    s = Settings()
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert (
        f"dandelion_drift_share >= {s.monitoring.drift_share_threshold}"
        in exprs["DandelionDataDrift"]
    )
    # The live-accuracy floor is the API's setting, exported by the API as a gauge.
    assert (
        "dandelion_live_accuracy < on (job, instance) dandelion_live_accuracy_floor"
        in (exprs["DandelionLiveAccuracyLow"])
    )
    low = next(r for r in alert_rules() if r["alert"] == "DandelionLiveAccuracyLow")
    assert (
        f"reviewer page (port {s.review.review_port}, `nox -s review`)"
        in (low["annotations"]["description"])
    )
    exported = ApiMetrics(live_accuracy_floor=0.85).render().decode()
    assert "\ndandelion_live_accuracy_floor 0.85\n" in exported


def test_alert_metrics_are_catalogued() -> None:
    known = catalogue()
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            assert base_name(name, known), f"{rule['alert']} uses uncatalogued metric {name}"


def test_alert_jobs_are_scraped() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {sc["job_name"] for sc in config["scrape_configs"]}
    assert {"api", "statsd-exporter", "prometheus", "grafana"} <= jobs
    assert config["rule_files"] == ["alerts.yml"]
    for rule in alert_rules():
        for m in re.finditer(r'job(=~|=)"([^"]+)"', rule["expr"]):
            for job in m.group(2).split("|"):
                assert job in jobs, f"{rule['alert']} refers to unknown job {job}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_runbook_entry(rule: dict) -> None:
    name = rule["alert"]
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
    assert rule["annotations"]["runbook_url"] == f"docs/monitoring.md#{name.lower()}"
    doc = DOC.read_text()
    assert f"### {name}\n" in doc, f"docs/monitoring.md has no runbook section for {name}"
    section = doc.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
    assert "**Do**" in section or "Do:" in section, f"runbook of {name} says nothing to do"
