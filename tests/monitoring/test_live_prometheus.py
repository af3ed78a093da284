"""Live: Debian's Prometheus scrapes a running API (``python -m api`` serving a model
registered in a real MLflow server) under a short bounded load with bad requests, feedback
and a drifted batch. Then every dashboard query runs through Prometheus's HTTP API, the
alert rules load and evaluate, and the drift gauges move only for the drifted batch.

Airflow panels (pipeline.json) are excepted: the statsd-exporter cannot run here; their
metrics are checked statically in test_statsd_mappings.py.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from monitoring_support import (
    MONITORING,
    alert_rules,
    darken,
    grayscale,
    panel_queries,
)

from dandelion_lib.core.images import decode_image
from tests.conftest import free_port, wait_http
from tests.process_support import stop

pytestmark = pytest.mark.slow

AIRFLOW_BOARD = "pipeline.json"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval for a 1 s scrape interval and short ranges
FEEDBACK = 40
MODEL_NAME = "dandelion-live-monitoring"


@dataclass
class Live:
    prom: str
    api: str
    start: float
    end: float = 0.0
    in_dist: dict[str, Any] = field(default_factory=dict)
    drifted: dict[str, Any] = field(default_factory=dict)
    bad_statuses: list[int] = field(default_factory=list)
    predict_statuses: list[int] = field(default_factory=list)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        body = httpx.get(f"{self.prom}/api/v1/query", params=params, timeout=30).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


def _prometheus_config(api_port: int, prom_port: int, mlflow: str, folder: Path) -> Path:
    """monitoring/prometheus.yml with loopback targets and a 1 s scrape interval; the jobs
    that cannot run here (statsd-exporter, grafana) are left out."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {sc["job_name"]: sc for sc in config["scrape_configs"]}
    assert {"api", "prometheus", "mlflow"} <= set(jobs)
    jobs["api"]["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    jobs["mlflow"]["static_configs"] = [{"targets": [mlflow.removeprefix("http://")]}]
    config["scrape_configs"] = [jobs["api"], jobs["prometheus"], jobs["mlflow"]]
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    (folder / "alerts.yml").write_text((MONITORING / "alerts.yml").read_text())
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_requests(photo: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx kwargs): inputs the API must refuse with a 4xx."""
    return [
        ("POST", "/predict", {"content": b"", "headers": {"content-type": "image/jpeg"}}),
        ("POST", "/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        (
            "POST",
            "/predict",
            {"files": {"file": ("t.jpg", photo[: len(photo) // 3], "image/jpeg")}},
        ),
        ("POST", "/predict", {"files": {"file": ("x.jpg", b"<html>no</html>", "image/jpeg")}}),
        ("POST", "/predict", {"files": {"image": ("w.jpg", photo, "image/jpeg")}}),
        ("POST", "/predict", {"files": {"file": ("e.jpg", b"", "image/jpeg")}}),
        ("POST", "/predict/batch", {"files": [("wrong", ("a.jpg", photo, "image/jpeg"))]}),
        ("POST", "/feedback", {"json": {"prediction_id": "nope", "correct_label": "grass"}}),
        ("POST", "/feedback", {"json": {"prediction_id": "nope"}}),
        ("GET", "/no-such-route", {}),
    ] * 2


def _wait_scraped(live: Live, predictions: int, timeout: float = 120.0) -> None:
    """Until Prometheus has scraped a /metrics that counts ``predictions`` predictions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.value('sum(dandelion_predictions_total{job="api"})') >= predictions:
            time.sleep(1.5)  # one more scrape: drift gauges are computed at scrape time
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus never saw {predictions} predictions")


def _drift_snapshot(live: Live) -> dict[str, Any]:
    psi = {
        r["metric"]["feature"]: float(r["value"][1])
        for r in live.query('dandelion_drift_psi{job="api"}')
    }
    return {
        "psi": psi,
        "share": live.value('dandelion_drift_share{job="api"}'),
        "window": live.value('dandelion_drift_window_images{job="api"}'),
    }


@pytest.fixture(scope="module")
def live(
    mlflow_server: str,
    s3_server: str,
    greenr_dir: Path,
    prometheus_bin: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Live]:
    # The API team's launch: a tiny real model registered in MLflow, `python -m api`.
    from tests.api.conftest import (
        Registry,
        api_env,
        dataset_images,
        start_api,
        stop_api,
        train_parts,
    )

    # A model name of its own: the API tests' server watches theirs in the same MLflow.
    registry = Registry(mlflow_server, s3_server, train_parts(greenr_dir), name=MODEL_NAME)
    registry.set_alias(registry.register())
    work = tmp_path_factory.mktemp("live")
    api_port, prom_port = free_port(), free_port()
    env = api_env(work / "api", api_port, mlflow_server, DANDELION_MODEL_NAME=MODEL_NAME)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env["PYTHONPATH"], os.environ.get("PYTHONPATH")) if p
    )
    api_proc = start_api(env, work / "api.log")
    prom_proc: subprocess.Popen | None = None
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_http(f"{api}/health/live", timeout=180, proc=api_proc)
        deadline = time.monotonic() + 240
        while httpx.get(f"{api}/health/ready", timeout=30).status_code != 200:
            assert api_proc.poll() is None and time.monotonic() < deadline, "API never ready"
            time.sleep(0.5)

        config = _prometheus_config(api_port, prom_port, mlflow_server, work)
        prom_log = (work / "prometheus.log").open("wb")
        prom_proc = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
        prom = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prom}/-/ready", timeout=60, proc=prom_proc)
        state = Live(prom=prom, api=api, start=time.time())
        deadline = time.monotonic() + 60
        while state.value('up{job="api"}') != 1 or state.value('up{job="mlflow"}') != 1:
            assert time.monotonic() < deadline, "Prometheus never scraped the API and MLflow"
            time.sleep(0.5)

        heldout = dataset_images(greenr_dir, parity=1)  # never in the drift reference
        labels = ("dandelion", "grass")
        with httpx.Client(base_url=api, timeout=60) as client, ThreadPoolExecutor(4) as pool:

            def predict(data: bytes) -> httpx.Response:
                return client.post("/predict", files={"file": ("p.jpg", data, "image/jpeg")})

            # 1. In-distribution traffic: 200 held-out photos, 40 of them in batches.
            photos = [(p.read_bytes(), y) for p, y in heldout]
            singles = list(pool.map(lambda item: predict(item[0]), photos[40:]))
            batches = [
                client.post(
                    "/predict/batch",
                    files=[
                        ("files", (f"{i}.jpg", d, "image/jpeg"))
                        for i, (d, _) in enumerate(photos[j : j + 10])
                    ],
                )
                for j in range(0, 40, 10)
            ]
            state.predict_statuses = [r.status_code for r in singles + batches]
            _wait_scraped(state, len(photos))
            state.in_dist = _drift_snapshot(state)

            # 2. Feedback with the true labels: agree where the model was right.
            for (_, y), r in list(zip(photos[40:], singles, strict=True))[:FEEDBACK]:
                client.post(
                    "/feedback",
                    json={"prediction_id": r.json()["prediction_id"], "correct_label": labels[y]},
                ).raise_for_status()

            # 3. Bad requests (all must be 4xx).
            for method, path, kwargs in _bad_requests(photos[0][0]):
                state.bad_statuses.append(client.request(method, path, **kwargs).status_code)

            # 4. A drifted batch: the same photos taken at dusk, then in grayscale.
            originals = [decode_image(d) for d, _ in photos[:100]]
            drifted = [_jpeg(darken(img)) for img in originals] + [
                _jpeg(grayscale(img)) for img in originals
            ]
            state.predict_statuses += [r.status_code for r in pool.map(predict, drifted)]
            _wait_scraped(state, len(photos) + len(drifted))
            state.drifted = _drift_snapshot(state)
        time.sleep(3)  # a few evaluations of the alert rules on the final state
        state.end = time.time()
        yield state
    finally:
        if prom_proc is not None:
            stop(prom_proc)
        stop_api(api_proc)


def test_mlflow_server_requests_are_scraped(live: Live) -> None:
    """The tracking server's own /metrics (``--expose-prometheus``), as the API used it."""
    assert live.value('up{job="mlflow"}') == 1
    served = live.value('sum(mlflow_http_request_total{job="mlflow", status="200"})')
    assert served > 0, "no successful MLflow request counted"


def test_the_load_was_served(live: Live) -> None:
    assert live.predict_statuses and set(live.predict_statuses) == {200}
    assert live.bad_statuses and all(400 <= s < 500 for s in live.bad_statuses), live.bad_statuses


def test_every_panel_query_returns_data(live: Live) -> None:
    """Each panel's PromQL, as Grafana sends it (a range query over the test's window),
    returns at least one series with a finite value."""
    failures, checked = [], 0
    for board, title, expr in panel_queries():
        if board == AIRFLOW_BOARD:
            continue
        checked += 1
        query = expr.replace("$__rate_interval", RATE_INTERVAL)
        body = httpx.get(
            f"{live.prom}/api/v1/query_range",
            params={"query": query, "start": live.start, "end": live.end, "step": "1s"},
            timeout=60,
        ).json()
        if body["status"] != "success":
            failures.append(f"{board}: {title}: {body.get('error')}")
            continue
        values = [float(v) for s in body["data"]["result"] for _, v in s["values"]]
        if not any(math.isfinite(v) for v in values):
            failures.append(f"{board}: {title}: no data for {query}")
    assert checked >= 30
    assert failures == []


def test_drift_gauges_rise_for_the_drifted_batch_only(live: Live) -> None:
    before, after = live.in_dist, live.drifted
    print(f"\nin distribution: {before}\ndrifted batch:   {after}")
    assert before["window"] == 200 and after["window"] == 200
    assert set(before["psi"]) == {
        "brightness", "contrast", "saturation", "green_fraction", "yellow_fraction", "sharpness"
    }  # fmt: skip
    # In distribution: every feature stays well below a real shift.
    assert max(before["psi"].values()) < 0.5, before
    # Dusk and grayscale photos: brightness and saturation move a lot; most features drift.
    for feature in ("brightness", "saturation"):
        assert after["psi"][feature] > 1.0, after
        assert after["psi"][feature] > 3 * before["psi"][feature]
    # The share the API exports counts features above 0.2 without the window's noise floor
    # (dandelion_lib.lifecycle.monitoring.DriftMonitor.drifted_share applies it), so a chance feature
    # or two can count in distribution; the drifted batch counts most of them.
    assert after["share"] >= 0.5 and after["share"] > before["share"], (before, after)


def test_alert_rules_load_and_evaluate_on_live_metrics(live: Live) -> None:
    groups = httpx.get(f"{live.prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    alerts = httpx.get(f"{live.prom}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    active = {a["labels"]["alertname"]: a["state"] for a in alerts}
    assert "DandelionApiDown" not in active and "DandelionNoModelLoaded" not in active
    assert "DandelionHighErrorRate" not in active
    # Drift over a full window: pending (it must last 15 minutes before firing).
    assert active.get("DandelionDataDrift") == "pending", active


def test_bad_inputs_and_feedback_are_counted(live: Live) -> None:
    assert live.value('sum(dandelion_invalid_inputs_total{job="api"})') >= 10
    assert live.value('sum(dandelion_http_requests_total{job="api", status=~"4.."})') >= len(
        live.bad_statuses
    )
    five = live.value(
        'sum(dandelion_http_requests_total{job="api", route=~"/predict.*", status=~"5.."})'
    )
    assert math.isnan(five) or five == 0
    assert live.value('sum(dandelion_feedback_total{job="api"})') == FEEDBACK
    accuracy = live.value('dandelion_live_accuracy{job="api"}')
    agree = live.value('dandelion_feedback_total{job="api", agreement="agree"}')
    assert accuracy == pytest.approx(agree / FEEDBACK)
