"""The MLflow tracking server's Prometheus metrics (`mlflow server --expose-prometheus`)."""

from __future__ import annotations

import re

import httpx


def _requests(metrics: str, status: str) -> float:
    pattern = rf'^mlflow_http_request_total\{{method="POST",status="{status}"\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, metrics, re.MULTILINE))


def test_mlflow_server_counts_its_requests(mlflow_server: str) -> None:
    before = _requests(httpx.get(f"{mlflow_server}/metrics", timeout=30).text, "200")
    for _ in range(3):
        response = httpx.post(
            f"{mlflow_server}/api/2.0/mlflow/experiments/search",
            json={"max_results": 1},
            timeout=30,
        )
        assert response.status_code == 200
    metrics = httpx.get(f"{mlflow_server}/metrics", timeout=30).text
    assert _requests(metrics, "200") >= before + 3
    assert "mlflow_http_request_duration_seconds_bucket" in metrics
