"""Grafana dashboards as code: committed JSON equals the generator, every query is valid
PromQL over catalogued metrics, the required panels exist, provisioning agrees."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from monitoring_support import (
    DASHBOARDS,
    MONITORING,
    base_name,
    catalogue,
    dashboards,
    instant,
    metric_names,
    panel_queries,
)

from dandelion_lib.core.config import Settings

# The fast tier (`nox -s unit`): no servers, no training.
pytestmark = pytest.mark.unit

GRAFANA = MONITORING / "grafana"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dandelion_dashboards", GRAFANA / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_equals_the_generator_output() -> None:
    rendered = _generator().render()
    assert set(rendered) == {p.name for p in DASHBOARDS.glob("*.json")}
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, (
            f"{name} is stale: run python monitoring/grafana/generate.py"
        )


def test_generator_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    gen = _generator()
    gen.OUT_DIR = tmp_path
    assert gen.main(["--check"]) == 1  # nothing written yet
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    target = tmp_path / "model.json"
    target.write_text(target.read_text().replace("Drift", "Drfit", 1))
    assert gen.main(["--check"]) == 1


def test_every_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses every panel query (as a recording rule), Grafana variables
    replaced as Grafana would before sending it."""
    queries = panel_queries()
    rules = {
        "groups": [
            {
                "name": "panels",
                "rules": [
                    {"record": f"panel:q{i}", "expr": instant(e)}
                    for i, (_, _, e) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout + proc.stderr
    assert len(queries) >= 40


def test_queries_use_only_catalogued_metrics_and_cover_the_api_contract() -> None:
    known = catalogue()
    used = set()
    for board, title, expr in panel_queries():
        names = metric_names(expr)
        assert names, f"{board}: {title}: no metric in {expr}"
        for name in names:
            base = base_name(name, known)
            assert base, f"{board}: {title}: {name} is not in the catalogue"
            used.add(base)
    api = {n for n, v in known.items() if v["source"] == "API"}
    assert api - used == set(), "API metrics without a panel"


def _titles(board: str) -> str:
    return " | ".join(p["title"].lower() for p in dashboards()[board]["panels"])


@pytest.mark.parametrize(
    ("board", "needed"),
    [
        (
            "service-overview.json",
            ["requests / s", "latency percentiles", "p95", "error", "queue", "cpu", "memory"],
        ),
        (
            "model.json",
            [
                "by label",
                "confidence",
                "psi",
                "per feature",
                "live accuracy",
                "version timeline",
                "feedback",
            ],
        ),
        ("pipeline.json", ["dag runs", "task duration", "failures", "retries"]),
    ],
)
def test_required_panels_exist(board: str, needed: list[str]) -> None:
    titles = _titles(board)
    for word in needed:
        assert word in titles, f"{board} has no panel about {word!r}"


def test_panel_thresholds_mirror_the_settings() -> None:
    s = Settings()
    panels = {p["title"]: p for p in dashboards()["model.json"]["panels"]}
    steps = panels["Drift (PSI) per feature"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == s.monitoring.drift_psi_threshold
    steps = panels["Live accuracy (feedback)"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == s.promotion.promotion_floor


def test_layout_and_datasources() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["apiVersion"] == 1 and datasource["datasources"][0]["type"] == "prometheus"
    uids = set()
    for name, board in dashboards().items():
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in board["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, (name, p["title"])
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not mine & cells, f"{name}: {p['title']} overlaps another panel"
            cells |= mine
            if p["type"] != "row":
                assert p["datasource"]["uid"] == uid
                assert p["targets"] and all(t["datasource"]["uid"] == uid for t in p["targets"])
    assert len(uids) == 3


def test_dashboard_provider_points_at_the_folder_of_json() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/dandelion.yml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/var/lib/grafana/dashboards"


def test_generator_runs_as_a_script(tmp_path: Path) -> None:
    copy = tmp_path / "grafana"
    shutil.copytree(GRAFANA, copy)
    proc = subprocess.run(
        ["python3", str(copy / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_airflow_panels_are_exactly_the_pipeline_dashboard() -> None:
    """The live test runs every panel except the Airflow ones (no statsd-exporter here):
    those are exactly the Pipeline dashboard's, and it has no others."""
    for board, title, expr in panel_queries():
        airflow = all(n.startswith("airflow_") for n in metric_names(expr))
        assert airflow == (board == "pipeline.json"), f"{board}: {title}"
