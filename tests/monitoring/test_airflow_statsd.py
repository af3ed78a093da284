"""What a real Airflow 3 run sends over StatsD, through the mapping.

A probe DAG (``train`` succeeds, ``evaluate`` fails, is retried once and fails again) runs
in a real Airflow (SQLite metadata DB) with ``[metrics] statsd_on``, sending to a UDP socket
of this test. The core metrics are initialised as the scheduler does (``airflow dags test``
alone leaves them off, so DAG-run metrics would be missing). Every datagram is then put
through the statsd-exporter's mapping rules (re-implemented in monitoring_support, since the
exporter itself cannot run here) and the series it would expose are matched against the
selectors of the Pipeline dashboard and the DAG alerts.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from monitoring_support import (
    MAPPING,
    alert_rules,
    exposed_names,
    load_mappings,
    map_metric,
    panel_queries,
)

# Slow: a real Airflow run of the probe DAG with a retried task (about 1.5 minutes).
pytestmark = pytest.mark.slow

DAG_ID = "dandelion_statsd_probe"
PROBE_DAG = f'''
from datetime import datetime, timedelta

from airflow.sdk import dag, task


@dag(dag_id="{DAG_ID}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def probe():
    @task(task_id="train")
    def train() -> int:
        return 1

    @task(task_id="evaluate", retries=1, retry_delay=timedelta(seconds=0))
    def evaluate(x: int) -> None:
        raise RuntimeError("quality gate failed (on purpose)")

    evaluate(train())


probe()
'''
RUN_PROBE = textwrap.dedent(
    """
    import sys
    from airflow._shared.observability.metrics import stats
    from airflow.configuration import conf
    from airflow.observability.metrics import stats_utils

    stats.initialize(
        factory=stats_utils.get_stats_factory(),
        export_legacy_names=conf.getboolean("metrics", "legacy_names_on"),
    )
    from airflow.dag_processing.dagbag import DagBag

    run = DagBag(sys.argv[1]).get_dag(sys.argv[2]).test()
    print("DAG RUN STATE:", run.state)
    """
)
STATSD_TYPES = {"c": "counter", "g": "gauge", "ms": "observer", "h": "observer", "d": "observer"}
LINE_RE = re.compile(r"^(?P<name>[^:|]+):(?P<value>[-+]?[0-9.eE+-]+)\|(?P<type>c|g|ms|h|d)(\|.*)?$")


@pytest.fixture(scope="module")
def datagrams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """StatsD lines sent by a real Airflow run of the probe DAG."""
    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(PROBE_DAG)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    lines: list[str] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data, _ = sock.recvfrom(65535)
            except TimeoutError:
                continue
            lines.extend(data.decode().splitlines())

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(sock.getsockname()[1]),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        }
    )
    bin_dir = Path(sys.executable).parent
    try:
        migrate = subprocess.run(
            [str(bin_dir / "airflow"), "db", "migrate"],
            env=env, capture_output=True, text=True, timeout=300, cwd=home,
        )  # fmt: skip
        assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
        run = subprocess.run(
            [sys.executable, "-c", RUN_PROBE, str(dags), DAG_ID],
            env=env, capture_output=True, text=True, timeout=300, cwd=home,
        )  # fmt: skip
        assert "DAG RUN STATE: failed" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
        yield lines
    finally:
        stop.set()
        receiver.join(timeout=5)
        sock.close()


@pytest.fixture(scope="module")
def series(datagrams: list[str]) -> dict[str, list[dict[str, str]]]:
    """Series the exporter would expose: name -> label sets (dropped and unmapped left out)."""
    mappings = load_mappings(MAPPING.read_text())
    out: dict[str, list[dict[str, str]]] = {}
    for line in datagrams:
        m = LINE_RE.match(line)
        assert m, f"not a StatsD line: {line!r}"
        statsd_type = STATSD_TYPES[m["type"]]
        hit = map_metric(mappings, m["name"], statsd_type)
        if hit is None or hit[0].action == "drop":
            continue
        mapping, name, labels = hit
        for exposed in exposed_names(name, statsd_type, mapping):
            out.setdefault(exposed, []).append(labels)
    return out


def test_airflow_sends_the_legacy_dotted_names(datagrams: list[str]) -> None:
    names = {line.split(":", 1)[0] for line in datagrams}
    assert f"airflow.ti.finish.{DAG_ID}.train.success" in names
    assert f"airflow.ti.finish.{DAG_ID}.evaluate.up_for_retry" in names
    assert f"airflow.ti.finish.{DAG_ID}.evaluate.failed" in names
    assert f"airflow.dag.{DAG_ID}.train.duration" in names
    assert f"airflow.dagrun.duration.failed.{DAG_ID}" in names


def test_every_datagram_with_a_dag_id_is_mapped_to_labels(datagrams: list[str]) -> None:
    mappings = load_mappings(MAPPING.read_text())
    for line in datagrams:
        name, _, rest = line.partition(":")
        statsd_type = STATSD_TYPES[rest.split("|")[1]]
        hit = map_metric(mappings, name, statsd_type)
        if DAG_ID in name:
            assert hit is not None and hit[0].action == "map", f"{name} is not mapped"
            assert hit[2].get("dag_id") == DAG_ID, (name, hit[2])
            assert DAG_ID not in hit[1], f"{name}: the DAG id ended up in the metric name"


def _matchers(body: str) -> list[tuple[str, str, str]]:
    return re.findall(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body)


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        actual = labels.get(label, "")
        ok = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not ok:
            return False
    return True


def _selected(expr: str, series: dict[str, list[dict[str, str]]]) -> list[str]:
    """The ``airflow_*`` selectors of a query that match no series of the real run."""
    unmatched = []
    text = re.sub(r"\[[^\]]*\]", "", expr)
    for m in re.finditer(r"(airflow_[a-zA-Z0-9_]*)\s*(\{([^}]*)\})?", text):
        name, body = m.group(1), m.group(3) or ""
        if not any(_matches(labels, _matchers(body)) for labels in series.get(name, [])):
            unmatched.append(f"{name}{{{body}}}")
    return unmatched


def test_failure_panels_and_alert_see_the_real_run(series: dict[str, list[dict[str, Any]]]) -> None:
    """The selectors of the DAG-failure alert and of the Pipeline panels about runs, task
    durations, failures and retries match series produced by the real run."""
    alert = next(r for r in alert_rules() if r["alert"] == "DandelionDagRunFailed")
    assert _selected(alert["expr"], series) == []
    panels = {title: expr for board, title, expr in panel_queries() if board == "pipeline.json"}
    for title in (
        "Failed runs (24h)",
        "DAG runs by state (per hour)",
        "DAG run duration (mean, by state)",
        "Task duration p95 (24h)",
        "Task duration (mean)",
        "Task failures (per hour)",
        "Task retries (per hour)",
        "Finished task instances by state (per hour)",
    ):
        assert _selected(panels[title], series) == [], title
    # Sanity: a selector for a state the run never reached matches nothing.
    assert _selected('airflow_ti_finish_total{state="no_such_state"}', series)
