"""Grafana dashboards as code: writes monitoring/grafana/dashboards/*.json.

    python monitoring/grafana/generate.py           # (re)write the JSON files
    python monitoring/grafana/generate.py --check   # exit 1 if the files are out of date

Three dashboards, all on the Prometheus datasource provisioned with uid
``dandelion-prometheus``: *Service overview* (the API: traffic, latency, errors,
saturation, CPU and memory), *Model* (predictions, confidence, drift and the share of
'unknown' answers, feedback accuracy, served version) and *Pipeline* (Airflow DAG runs, task durations, failures and retries,
from the statsd-exporter). Queries use only the metrics listed in docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "dandelion-prometheus"}
RATE = "$__rate_interval"
API = 'job="api"'
MLFLOW = 'job="mlflow"'
DANDELION_DAGS = 'dag_id=~"dandelion.*"'

Target = tuple[str, str]  # (PromQL, legend)


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _targets(targets: list[Target], fmt: str = "time_series") -> list[dict[str, Any]]:
    return [
        {
            "datasource": DATASOURCE,
            "expr": expr,
            "legendFormat": legend,
            "format": fmt,
            "refId": chr(ord("A") + i),
        }
        for i, (expr, legend) in enumerate(targets)
    ]


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def row(lay: Layout, title: str) -> dict[str, Any]:
    if lay.x:
        lay.x, lay.y, lay.row_h = 0, lay.y + lay.row_h, 0
    panel = {
        "type": "row",
        "id": lay.new_id(),
        "title": title,
        "collapsed": False,
        "gridPos": lay.place(24, 1),
        "panels": [],
    }
    lay.x, lay.y, lay.row_h = 0, lay.y + 1, 0
    return panel


def stat(
    lay: Layout,
    title: str,
    expr: str,
    *,
    unit: str = "short",
    legend: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
    description: str = "",
    decimals: int | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": _thresholds(thresholds or [(None, "green")]),
        "color": {"mode": "thresholds"},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(6, 4),
        "targets": _targets([(expr, legend)]),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def timeseries(
    lay: Layout,
    title: str,
    targets: list[Target],
    *,
    unit: str = "short",
    description: str = "",
    threshold: float | None = None,
    stack: bool = False,
    min_: float | None = None,
    max_: float | None = None,
    width: int = 12,
) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if threshold is not None:
        defaults["thresholds"] = _thresholds([(None, "green"), (threshold, "red")])
        custom["thresholdsStyle"] = {"mode": "line+area"}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(width, 8),
        "targets": _targets(targets),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def heatmap(lay: Layout, title: str, expr: str, *, description: str = "") -> dict[str, Any]:
    return {
        "type": "heatmap",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(12, 8),
        "targets": _targets([(expr, "{{le}}")], fmt="heatmap"),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": "percentunit"},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
        },
    }


def state_timeline(
    lay: Layout, title: str, targets: list[Target], *, description: str = ""
) -> dict[str, Any]:
    return {
        "type": "state-timeline",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(24, 6),
        "targets": _targets(targets),
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": _thresholds([(None, "transparent"), (1, "green")]),
                "mappings": [{"type": "value", "options": {"1": {"text": "serving"}}}],
            },
            "overrides": [],
        },
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.8},
    }


def bargauge(
    lay: Layout, title: str, targets: list[Target], *, unit: str, description: str = ""
) -> dict[str, Any]:
    return {
        "type": "bargauge",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(12, 8),
        "targets": _targets(targets),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["dandelion"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [
            {"title": t, "type": "link", "url": f"/d/{u}"}
            for u, t in DASHBOARD_TITLES.items()
            if u != uid
        ],
        "panels": panels,
    }


DASHBOARD_TITLES = {
    "dandelion-service": "dandelion / Service overview",
    "dandelion-model": "dandelion / Model",
    "dandelion-pipeline": "dandelion / Pipeline",
}


def _quantile(q: float, metric: str, selector: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


def service_overview() -> dict:
    lay = Layout()
    req = "dandelion_http_requests_total"
    dur = "dandelion_http_request_duration_seconds"
    panels = [
        row(lay, "Golden signals"),
        stat(
            lay,
            "API targets up",
            f"sum(up{{{API}}})",
            thresholds=[(None, "red"), (1, "green")],
            description="Scraped API instances answering /metrics.",
        ),
        stat(
            lay,
            "Requests / s",
            f"sum(rate({req}{{{API}}}[{RATE}]))",
            unit="reqps",
            decimals=2,
        ),
        stat(
            lay,
            "5xx ratio",
            f'(sum(rate({req}{{{API}, status=~"5.."}}[{RATE}])) or vector(0))'
            f" / sum(rate({req}{{{API}}}[{RATE}]))",
            unit="percentunit",
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            description="Share of requests answered with a server error (503 included).",
        ),
        stat(
            lay,
            "p95 latency /predict",
            _quantile(0.95, dur, f'{API}, route="/predict"'),
            unit="s",
            thresholds=[(None, "green"), (0.3, "orange"), (0.5, "red")],
            description="Objective: 500 ms (alert DandelionHighLatencyP95).",
        ),
        row(lay, "Traffic"),
        timeseries(
            lay,
            "Requests / s by route",
            [(f"sum by (route, method) (rate({req}{{{API}}}[{RATE}]))", "{{method}} {{route}}")],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Responses / s by status",
            [(f"sum by (status) (rate({req}{{{API}}}[{RATE}]))", "{{status}}")],
            unit="reqps",
            stack=True,
        ),
        row(lay, "Latency"),
        timeseries(
            lay,
            "Latency percentiles: POST /predict",
            [
                (_quantile(q, dur, f'{API}, route="/predict"'), f"p{int(q * 100)}")
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s",
            threshold=0.5,
        ),
        timeseries(
            lay,
            "Latency p95 by route",
            [(_quantile(0.95, dur, API, by="le, route"), "{{route}}")],
            unit="s",
        ),
        row(lay, "Errors"),
        timeseries(
            lay,
            "Error responses / s (4xx, 5xx)",
            [
                (
                    f'sum by (status, route) (rate({req}{{{API}, status=~"[45].."}}[{RATE}]))',
                    "{{status}} {{route}}",
                )
            ],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Rejected inputs / s by reason",
            [
                (
                    f"sum by (reason) (rate(dandelion_invalid_inputs_total{{{API}}}[{RATE}]))",
                    "{{reason}}",
                )
            ],
            unit="reqps",
            description="Bad images and requests answered 4xx (problem+json).",
        ),
        row(lay, "Saturation"),
        timeseries(
            lay,
            "Inference queue",
            [
                (f"sum(dandelion_queue_depth{{{API}}})", "depth"),
                (f"sum(dandelion_queue_capacity{{{API}}})", "capacity"),
            ],
            description="Images waiting for the model; 503 + Retry-After when full.",
        ),
        timeseries(
            lay,
            "Queue rejections (503) / s",
            [(f"sum(rate(dandelion_queue_rejections_total{{{API}}}[{RATE}]))", "rejected")],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Dependency failures (503) / s",
            [
                (
                    f"sum by (dependency, reason) "
                    f"(rate(dandelion_dependency_failures_total{{{API}}}[{RATE}]))",
                    "{{dependency}} {{reason}}",
                )
            ],
            unit="reqps",
        ),
        timeseries(
            lay,
            "Micro-batch size",
            [
                (
                    f"sum(rate(dandelion_inference_batch_size_sum{{{API}}}[{RATE}]))"
                    f" / sum(rate(dandelion_inference_batch_size_count{{{API}}}[{RATE}]))",
                    "mean",
                ),
                (_quantile(0.95, "dandelion_inference_batch_size", API), "p95"),
            ],
            description="Images per model call: grows with concurrent load.",
        ),
        timeseries(
            lay,
            "Model calls / s",
            [(f"sum(rate(dandelion_inference_batch_size_count{{{API}}}[{RATE}]))", "batches")],
            unit="ops",
        ),
        row(lay, "Tracking server (MLflow)"),
        timeseries(
            lay,
            "MLflow requests / s by status",
            [
                (
                    f"sum by (status) (rate(mlflow_http_request_total{{{MLFLOW}}}[{RATE}]))",
                    "{{status}}",
                )
            ],
            unit="reqps",
            description="The API, the pipeline and people's notebooks all go through MLflow.",
        ),
        timeseries(
            lay,
            "MLflow latency p95",
            [(_quantile(0.95, "mlflow_http_request_duration_seconds", MLFLOW), "p95")],
            unit="s",
        ),
        row(lay, "Resources"),
        timeseries(
            lay,
            "CPU (cores)",
            [(f"rate(process_cpu_seconds_total{{{API}}}[{RATE}])", "{{instance}}")],
            unit="short",
        ),
        timeseries(
            lay,
            "Resident memory",
            [(f"process_resident_memory_bytes{{{API}}}", "{{instance}}")],
            unit="bytes",
        ),
    ]
    return dashboard(
        "dandelion-service",
        DASHBOARD_TITLES["dandelion-service"],
        "The prediction API: traffic, latency, errors, saturation, CPU and memory; the MLflow tracking server's traffic.",
        panels,
    )


def model_dashboard() -> dict:
    lay = Layout()
    panels = [
        row(lay, "Served model"),
        stat(
            lay,
            "Model loaded",
            f"min(dandelion_model_loaded{{{API}}})",
            thresholds=[(None, "red"), (1, "green")],
        ),
        stat(
            lay,
            "Serving version",
            f"max by (name, version, alias) (dandelion_model_info{{{API}}})",
            legend="{{name}} v{{version}} ({{alias}})",
            description="The registered model version each API instance serves.",
        ),
        stat(
            lay,
            "Live accuracy",
            f"avg(dandelion_live_accuracy{{{API}}})",
            unit="percentunit",
            thresholds=[(None, "red"), (0.9, "green")],
            description="Accuracy from user feedback; floor 90% (alert DandelionLiveAccuracyLow).",
        ),
        stat(
            lay,
            "Drifted features",
            f"max(dandelion_drift_share{{{API}}})",
            unit="percentunit",
            thresholds=[(None, "green"), (0.01, "orange"), (0.5, "red")],
            description="Share of image features whose PSI is above threshold and noise.",
        ),
        state_timeline(
            lay,
            "Model version timeline",
            [(f"max by (version) (dandelion_model_info{{{API}}})", "v{{version}}")],
            description="Which registered version was served when (hot reloads appear as "
            "a new row).",
        ),
        row(lay, "Predictions"),
        timeseries(
            lay,
            "Predictions / s by label",
            [
                (
                    f"sum by (label) (rate(dandelion_predictions_total{{{API}}}[{RATE}]))",
                    "{{label}}",
                )
            ],
            unit="ops",
            stack=True,
        ),
        timeseries(
            lay,
            "Reviews / s (not users' predictions)",
            [(f"sum(rate(dandelion_review_predictions_total{{{API}}}[{RATE}]))", "reviews")],
            unit="ops",
            description="Answers to reviewers looking again at photos already answered "
            "(purpose=review: the reviewer page's maps). They are left out of the predictions, "
            "the answer shares and drift.",
        ),
        timeseries(
            lay,
            "Share of predictions by label",
            [
                (
                    f"sum by (label) (rate(dandelion_predictions_total{{{API}}}[{RATE}]))"
                    f" / ignoring (label) group_left"
                    f" sum(rate(dandelion_predictions_total{{{API}}}[{RATE}]))",
                    "{{label}}",
                )
            ],
            unit="percentunit",
            min_=0,
            max_=1,
            description="A shift in the label mix is an early sign of drift.",
        ),
        heatmap(
            lay,
            "Prediction confidence",
            f"sum by (le) (increase(dandelion_prediction_confidence_bucket{{{API}}}[{RATE}]))",
            description="Confidence of served predictions; low values end up 'uncertain'.",
        ),
        timeseries(
            lay,
            "Confidence percentiles",
            [
                (_quantile(q, "dandelion_prediction_confidence", API), f"p{int(q * 100)}")
                for q in (0.1, 0.5)
            ],
            unit="percentunit",
            min_=0,
            max_=1,
        ),
        row(lay, "Drift"),
        timeseries(
            lay,
            "Drift (PSI) per feature",
            [(f"max by (feature) (dandelion_drift_psi{{{API}}})", "{{feature}}")],
            threshold=0.2,
            description="Population stability index of the served window against the "
            "training reference; above 0.2 is a real shift.",
        ),
        timeseries(
            lay,
            "Drifted share and window",
            [
                (f"max(dandelion_drift_share{{{API}}})", "drifted share"),
                (f"sum(dandelion_drift_window_images{{{API}}})", "images in window"),
            ],
            description="Alert DandelionDataDrift: share >= 0.5 on a window of >= 50 images.",
        ),
        timeseries(
            lay,
            "Share of unknown answers",
            [
                (
                    f'sum(increase(dandelion_predictions_total{{{API}, label="unknown"}}[1h]))'
                    f" / sum(increase(dandelion_predictions_total{{{API}}}[1h]))",
                    "last hour",
                ),
                (
                    f'sum(increase(dandelion_predictions_total{{{API}, label="unknown"}}[7d]))'
                    f" / sum(increase(dandelion_predictions_total{{{API}}}[7d]))",
                    "last 7 days",
                ),
            ],
            unit="percentunit",
            threshold=0.1,
            min_=0,
            description="Photos answered 'unknown' (neither a dandelion nor grass) among all "
            "answers, over the last hour and the last 7 days. Alert DandelionUnknownShareJump: "
            "the last hour's share is above 10% and more than double that of the 7 days before "
            "it, on >= 50 predictions in the hour.",
            width=24,
        ),
        row(lay, "Feedback"),
        timeseries(
            lay,
            "Live accuracy (feedback)",
            [
                (f"avg(dandelion_live_accuracy{{{API}}})", "accuracy"),
                (f"avg(dandelion_live_accuracy_floor{{{API}}})", "floor (alert below)"),
            ],
            unit="percentunit",
            threshold=0.9,
            min_=0,
            max_=1,
        ),
        timeseries(
            lay,
            "Feedback / s by agreement",
            [
                (
                    f"sum by (agreement) (rate(dandelion_feedback_total{{{API}}}[{RATE}]))",
                    "{{agreement}}",
                )
            ],
            unit="ops",
            stack=True,
        ),
        timeseries(
            lay,
            "Model reload failures",
            [
                (
                    f"sum(increase(dandelion_model_reload_failures_total{{{API}}}[{RATE}]))",
                    "failed reloads",
                )
            ],
            width=24,
        ),
    ]
    return dashboard(
        "dandelion-model",
        DASHBOARD_TITLES["dandelion-model"],
        "The served model: predictions, confidence, drift, feedback accuracy, versions.",
        panels,
    )


def pipeline_dashboard() -> dict:
    lay = Layout()
    runs = "airflow_dagrun_duration_seconds_count"
    ti = "airflow_ti_finish_total"
    panels = [
        row(lay, "DAG runs"),
        stat(
            lay,
            "Successful runs (24h)",
            f'sum(increase({runs}{{{DANDELION_DAGS}, state="success"}}[1d])) or vector(0)',
            thresholds=[(None, "green")],
            decimals=0,
        ),
        stat(
            lay,
            "Failed runs (24h)",
            f'sum(increase({runs}{{{DANDELION_DAGS}, state="failed"}}[1d])) or vector(0)',
            thresholds=[(None, "green"), (1, "red")],
            decimals=0,
        ),
        stat(
            lay,
            "Run success rate (7d)",
            f'sum(increase({runs}{{{DANDELION_DAGS}, state="success"}}[7d]))'
            f" / sum(increase({runs}{{{DANDELION_DAGS}}}[7d]))",
            unit="percentunit",
            thresholds=[(None, "red"), (0.8, "orange"), (0.95, "green")],
        ),
        stat(
            lay,
            "DAG import errors",
            "max(airflow_dag_processing_import_errors) or vector(0)",
            thresholds=[(None, "green"), (1, "red")],
            decimals=0,
        ),
        timeseries(
            lay,
            "DAG runs by state (per hour)",
            [
                (
                    f"sum by (dag_id, state) (increase({runs}{{{DANDELION_DAGS}}}[1h]))",
                    "{{dag_id}} {{state}}",
                )
            ],
            stack=True,
        ),
        timeseries(
            lay,
            "DAG run duration (mean, by state)",
            [
                (
                    f"sum by (dag_id, state) (rate(airflow_dagrun_duration_seconds_sum"
                    f"{{{DANDELION_DAGS}}}[1h]))"
                    f" / sum by (dag_id, state) (rate({runs}{{{DANDELION_DAGS}}}[1h]))",
                    "{{dag_id}} {{state}}",
                )
            ],
            unit="s",
        ),
        row(lay, "Tasks"),
        bargauge(
            lay,
            "Task duration p95 (24h)",
            [
                (
                    "histogram_quantile(0.95, sum by (dag_id, task_id, le) "
                    f"(rate(airflow_task_duration_seconds_bucket{{{DANDELION_DAGS}}}[1d])))",
                    "{{dag_id}}.{{task_id}}",
                )
            ],
            unit="s",
        ),
        timeseries(
            lay,
            "Task duration (mean)",
            [
                (
                    "sum by (task_id) (rate(airflow_task_duration_seconds_sum"
                    f"{{{DANDELION_DAGS}}}[1h]))"
                    " / sum by (task_id) (rate(airflow_task_duration_seconds_count"
                    f"{{{DANDELION_DAGS}}}[1h]))",
                    "{{task_id}}",
                )
            ],
            unit="s",
        ),
        timeseries(
            lay,
            "Task failures (per hour)",
            [
                (
                    f'sum by (dag_id, task_id) (increase({ti}{{{DANDELION_DAGS}, state="failed"}}[1h]))',
                    "{{dag_id}}.{{task_id}}",
                )
            ],
        ),
        timeseries(
            lay,
            "Task retries (per hour)",
            [
                (
                    "sum by (dag_id, task_id) "
                    f'(increase({ti}{{{DANDELION_DAGS}, state="up_for_retry"}}[1h]))',
                    "{{dag_id}}.{{task_id}}",
                )
            ],
        ),
        timeseries(
            lay,
            "Finished task instances by state (per hour)",
            [(f"sum by (state) (increase({ti}{{{DANDELION_DAGS}}}[1h]))", "{{state}}")],
            stack=True,
        ),
        timeseries(
            lay,
            "Scheduler heartbeats / s",
            [(f"sum(rate(airflow_scheduler_heartbeat_total[{RATE}]))", "heartbeats")],
            unit="ops",
        ),
    ]
    return dashboard(
        "dandelion-pipeline",
        DASHBOARD_TITLES["dandelion-pipeline"],
        "Airflow (through the statsd-exporter): DAG runs, task durations, failures, retries.",
        panels,
    )


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    boards = {
        "service-overview.json": service_overview(),
        "model.json": model_dashboard(),
        "pipeline.json": pipeline_dashboard(),
    }
    return {name: json.dumps(b, indent=2, sort_keys=True) + "\n" for name, b in boards.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Fail if the files are stale.")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale dashboards (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
