"""The statsd-exporter mapping for Airflow, validated statically.

The exporter (a Go binary shipped by the Airflow Helm chart) cannot run here, so its
mapping rules are re-implemented in monitoring_support (pkg/mapper: validation at load,
glob matching by dot-separated components in file order, then regexes, ``$n`` templates,
histogram suffixes) and applied to the StatsD names that Airflow 3 sends, taken from the
metric registry of the installed Airflow (``metrics_template.yaml``: every metric, its type
and its legacy dotted name). test_airflow_statsd.py checks the names a real run sends.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_support import (
    MAPPING,
    MONITORING,
    PROM_NAME_RE,
    STATSD_TYPE,
    Mapping,
    alert_rules,
    catalogue,
    exposed_names,
    format_template,
    grouping_labels,
    load_mappings,
    map_metric,
    metric_names,
    panel_queries,
    selectors,
)

# Example values for the variables of Airflow's metric names.
SAMPLES: dict[str, list[str]] = {
    "dag_id": ["dandelion_pipeline"],
    "task_id": ["train", "my_group__evaluate"],
    "state": ["success", "failed", "up_for_retry", "skipped"],
    "executor_class_name": ["LocalExecutor"],
    "pool_name": ["default_pool"],
    "queue": ["default"],
    "job_name": ["SchedulerJob"],
    "operator_name": ["PapermillOperator"],
}


def _registry_path() -> Path:
    import airflow

    for candidate in (
        Path(airflow.__file__).parent / "_shared" / "observability" / "metrics",
        Path(airflow.__file__).parent / "observability" / "metrics",
    ):
        if (candidate / "metrics_template.yaml").exists():
            return candidate / "metrics_template.yaml"
    pytest.fail("Airflow's metrics_template.yaml not found in the installed Airflow")


def _expand(template: str, variables: list[str]) -> list[str]:
    names = [template]
    for var in variables:
        names = [n.replace("{" + var + "}", v) for n in names for v in SAMPLES.get(var, ["x"])]
    return names


@pytest.fixture(scope="module")
def airflow_metrics() -> list[tuple[str, str, bool]]:
    """(StatsD name with the ``airflow`` prefix, StatsD type, is_legacy) of every metric in
    the installed Airflow's registry, with example values for the variables."""
    registry = yaml.safe_load(_registry_path().read_text())["metrics"]
    out = []
    for metric in registry:
        statsd_type = STATSD_TYPE[metric["type"]]
        variables = metric.get("name_variables") or []
        # The new name is always sent; plain StatsD drops its tags.
        for name in _expand(metric["name"], variables):
            out.append((f"airflow.{name}", statsd_type, False))
        if metric.get("legacy_name", "-") != "-":
            for name in _expand(metric["legacy_name"], variables):
                out.append((f"airflow.{name}", statsd_type, True))
    return out


@pytest.fixture(scope="module")
def mappings() -> list[Mapping]:
    return load_mappings(MAPPING.read_text())


@pytest.fixture(scope="module")
def produced(
    mappings: list[Mapping], airflow_metrics: list[tuple[str, str, bool]]
) -> dict[str, dict[str, Any]]:
    """Series name -> {labels, type, statsd names} the exporter would expose."""
    out: dict[str, dict[str, Any]] = {}
    for statsd_name, statsd_type, _ in airflow_metrics:
        hit = map_metric(mappings, statsd_name, statsd_type)
        if hit is None or hit[0].action == "drop":
            continue
        mapping, name, labels = hit
        for series in exposed_names(name, statsd_type, mapping):
            entry = out.setdefault(
                series, {"labels": set(labels), "type": statsd_type, "from": set(), "base": name}
            )
            entry["from"].add(statsd_name)
            assert entry["labels"] == set(labels), f"{series}: label sets differ"
            assert entry["type"] == statsd_type, f"{series}: mapped from several StatsD types"
    return out


def test_mapping_parses_by_the_exporter_rules(mappings: list[Mapping]) -> None:
    assert len(mappings) >= 10
    for m in mappings:
        if m.action == "map":
            for template in [m.name]:
                assert PROM_NAME_RE.match(format_template(template, ["x"] * 9)), m.name


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("mappings:\n  - match: airflow.a.*\n    name: ''\n", "didn't set a metric name"),
        ("mappings:\n  - match: airflow..a\n    name: x\n", "invalid match"),
        ("mappings:\n  - match: airflow.a\n    name: 1x\n", "metric name"),
        ("mappings:\n  - match: airflow.a\n    name: x\n    labels: {'bad-key': v}\n", "label key"),
        ("mappings:\n  - match: airflow.a\n    name: x\n    action: keep\n", "invalid action"),
        ("mappings:\n  - match: airflow.a\n    name: x\n    lables: {}\n", "unknown keys"),
    ],
)
def test_validator_rejects_what_the_exporter_rejects(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        load_mappings(text)


def test_airflow_names_map_to_labelled_metrics(mappings: list[Mapping]) -> None:
    cases = {
        ("airflow.ti.finish.dandelion_pipeline.train.up_for_retry", "counter"): (
            "airflow_ti_finish_total",
            {"dag_id": "dandelion_pipeline", "task_id": "train", "state": "up_for_retry"},
        ),
        ("airflow.dagrun.duration.failed.dandelion_pipeline", "observer"): (
            "airflow_dagrun_duration_seconds",
            {"dag_id": "dandelion_pipeline", "state": "failed"},
        ),
        ("airflow.dag.dandelion_pipeline.evaluate.duration", "observer"): (
            "airflow_task_duration_seconds",
            {"dag_id": "dandelion_pipeline", "task_id": "evaluate"},
        ),
        ("airflow.operator_failures_PapermillOperator", "counter"): (
            "airflow_operator_failures_total",
            {"operator": "PapermillOperator"},
        ),
        ("airflow.executor.running_tasks.LocalExecutor", "gauge"): (
            "airflow_executor_running_tasks",
            {"executor": "LocalExecutor"},
        ),
    }
    for (statsd_name, statsd_type), (name, labels) in cases.items():
        hit = map_metric(mappings, statsd_name, statsd_type)
        assert hit is not None and hit[0].action == "map", statsd_name
        assert (hit[1], hit[2]) == (name, labels)
    for dropped in (
        "airflow.ti.finish",
        "airflow.dagrun.duration.success",
        "airflow.task.duration",
    ):
        hit = map_metric(mappings, dropped, "counter" if "ti." in dropped else "observer")
        assert hit is not None and hit[0].action == "drop", dropped


def test_every_mapping_matches_an_airflow_3_metric(
    mappings: list[Mapping], airflow_metrics: list[tuple[str, str, bool]]
) -> None:
    """No mapping for a name Airflow 3 no longer sends (e.g. Airflow 2's
    dag_processing.last_runtime); each is the first match of some Airflow 3 metric."""
    used = set()
    for statsd_name, statsd_type, _ in airflow_metrics:
        hit = map_metric(mappings, statsd_name, statsd_type)
        if hit is not None:
            used.add(id(hit[0]))
    unused = [m.match for m in mappings if id(m) not in used]
    assert unused == []


def test_legacy_names_with_labels_are_all_mapped(
    mappings: list[Mapping], airflow_metrics: list[tuple[str, str, bool]]
) -> None:
    """The dotted names that carry a DAG or task id must never fall through to the
    exporter's default naming (one metric name per DAG and task)."""
    for statsd_name, statsd_type, legacy in airflow_metrics:
        if not legacy or not any(v in statsd_name for v in ("dandelion_pipeline", "train")):
            continue
        if statsd_name.startswith("airflow.edge_worker."):
            continue  # the Edge executor (a provider) is not used
        hit = map_metric(mappings, statsd_name, statsd_type)
        assert hit is not None, f"{statsd_name} is not mapped"


def test_dashboards_and_alerts_use_only_produced_airflow_metrics(
    produced: dict[str, dict[str, Any]],
) -> None:
    queries = [(f"{d}: {t}", e) for d, t, e in panel_queries()]
    queries += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    used = 0
    for where, expr in queries:
        airflow = {n for n in metric_names(expr) if n.startswith("airflow_")}
        if not airflow:
            continue
        used += 1
        available = {"job", "instance", "le"}
        for name in airflow:
            assert name in produced, f"{where}: {name} is produced by no mapping"
            available |= produced[name]["labels"]
        for name, labels in selectors(expr):
            if name.startswith("airflow_"):
                assert labels <= produced[name]["labels"] | {"job", "instance"}, (where, name)
        assert grouping_labels(expr) <= available, where
    assert used >= 10


def test_catalogue_lists_exactly_the_produced_airflow_metrics(
    produced: dict[str, dict[str, Any]],
) -> None:
    documented = {n: v for n, v in catalogue().items() if v["source"] == "Airflow"}
    bases = {v["base"]: v for v in produced.values()}
    assert set(documented) == set(bases)
    for name, doc in documented.items():
        assert doc["labels"] == bases[name]["labels"], name
        kind = {"counter": "counter", "gauge": "gauge", "observer": "histogram"}[
            bases[name]["type"]
        ]
        assert doc["type"] == kind, name


def test_mappings_are_self_contained_for_the_helm_chart(
    airflow_metrics: list[tuple[str, str, bool]],
) -> None:
    """The chart renders only the ``mappings`` list (``statsd.overrideMappings``): no
    ``defaults`` may be relied on, so every timer mapping sets its histogram itself."""
    raw = yaml.safe_load(MAPPING.read_text())
    assert set(raw) == {"mappings"}
    mappings = load_mappings(MAPPING.read_text())
    for statsd_name, statsd_type, _ in airflow_metrics:
        hit = map_metric(mappings, statsd_name, statsd_type)
        if statsd_type == "observer" and hit is not None and hit[0].action == "map":
            entry = raw["mappings"][mappings.index(hit[0])]
            assert entry.get("observer_type") == "histogram", entry["match"]
            assert entry["histogram_options"]["buckets"], entry["match"]


def test_helm_values_carry_the_same_mappings() -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_airflow_values", MONITORING / "generate_airflow_values.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values_path = MONITORING / "airflow-statsd-values.yaml"
    assert values_path.read_text() == module.render(), "run monitoring/generate_airflow_values.py"
    values = yaml.safe_load(values_path.read_text())
    assert values["statsd"]["overrideMappings"] == yaml.safe_load(MAPPING.read_text())["mappings"]
    assert module.main(["--check"]) == 0
