"""Predictions through the real API process: single, raw, batch, readiness, /model, logs."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dandelion_lib.core.features import FeatureSpec
from tests.api.conftest import ApiServer

PROBLEM = "application/problem+json"


def _images(greenr: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted((greenr / "dandelion").glob("*.jpg"))[1::7][: n // 2]
    files += sorted((greenr / "grass").glob("*.jpg"))[1::7][: n - len(files)]
    return [(p.name, p.read_bytes()) for p in files]


def _check_against_reference(server: ApiServer, body: dict, image: bytes) -> None:
    """The API's answer equals the same model version run in-process on the same bytes."""
    version = body["model"]["version"]
    (expected,) = server.registry.predictor(version).predict_bytes([image])
    for label, p in expected.probabilities.items():
        assert body["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert body["confidence"] == pytest.approx(expected.confidence, abs=1e-5)
    assert body["label"] in (expected.label, "uncertain")
    assert (body["label"] == "uncertain") == (body["confidence"] < 0.6)


def test_not_ready_before_a_version_has_the_alias(api_server: ApiServer) -> None:
    before = api_server.before_ready
    assert before["ready_status"] == 503
    assert before["ready_body"]["status"] == "not_ready"
    assert "alias" in before["ready_body"]["reason"]
    assert before["predict_status"] == 503
    assert before["predict_headers"]["content-type"].startswith(PROBLEM)
    assert "retry-after" in before["predict_headers"]
    assert before["predict_body"]["code"] == "model-unavailable"
    assert before["model"]["version"] is None and before["model"]["state"] == "waiting"


def test_ready_and_live_after_load(api_server: ApiServer) -> None:
    with api_server.client() as c:
        assert c.get("/health/live").json() == {"status": "alive"}
        ready = c.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"]["name"] == api_server.registry.name


def test_predict_multipart_and_raw_match_the_model(api_server: ApiServer, greenr_dir: Path) -> None:
    with api_server.client() as c:
        for name, data in _images(greenr_dir, 6):
            multipart = c.post("/predict", files={"file": (name, data, "image/jpeg")})
            raw = c.post("/predict", content=data, headers={"content-type": "image/jpeg"})
            for r in (multipart, raw):
                assert r.status_code == 200, r.text
                body = r.json()
                uuid.UUID(body["prediction_id"])
                assert body["model"]["name"] == api_server.registry.name
                assert body["latency_ms"] > 0
                _check_against_reference(api_server, body, data)
            assert multipart.json()["prediction_id"] != raw.json()["prediction_id"]


def test_an_all_black_image_is_answered_unknown(api_server: ApiServer) -> None:
    """A flat frame has nothing to classify: `unknown` with reason `blank_image`."""
    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, "JPEG")
    with api_server.client() as c:
        r = c.post("/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert (r.json()["label"], r.json()["reason"]) == ("unknown", "blank_image")


def test_model_is_better_than_chance_through_the_api(
    api_server: ApiServer, greenr_dir: Path
) -> None:
    """The held-out half of the reference images (the model was fit on the other half)."""
    from tests.api.conftest import dataset_images

    held_out = dataset_images(greenr_dir, parity=1)[::5]
    labels = ("dandelion", "grass")
    correct = 0
    with api_server.client() as c:
        for path, y in held_out:
            body = c.post(
                "/predict", content=path.read_bytes(), headers={"content-type": "image/jpeg"}
            ).json()
            top = max(body["probabilities"], key=body["probabilities"].get)
            correct += top == labels[y]
    assert correct / len(held_out) > 0.6


def test_batch_keeps_order_and_reports_bad_items(api_server: ApiServer, greenr_dir: Path) -> None:
    good = _images(greenr_dir, 4)
    files = [
        ("files", (good[0][0], good[0][1], "image/jpeg")),
        ("files", ("notes.txt", b"not an image at all", "text/plain")),
        ("files", (good[1][0], good[1][1], "image/jpeg")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("half.jpg", good[2][1][: len(good[2][1]) // 2], "image/jpeg")),
        ("files", (good[3][0], good[3][1], "image/jpeg")),
    ]
    with api_server.client() as c:
        r = c.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["succeeded"], body["failed"]) == (3, 3)
    results = body["results"]
    assert [item["index"] for item in results] == list(range(6))
    assert [item["filename"] for item in results] == [f[1][0] for f in files]
    assert results[1]["error"]["code"] == "unsupported-image"
    assert results[1]["error"]["status"] == 415
    assert results[3]["error"]["code"] == "empty-image"
    assert results[4]["error"]["code"] == "corrupt-image"
    for i, (_, data) in zip((0, 2, 5), (good[0], good[1], good[3]), strict=True):
        assert "error" not in results[i]
        _check_against_reference(api_server, results[i]["prediction"], data)


def test_concurrent_requests_are_micro_batched(api_server: ApiServer, greenr_dir: Path) -> None:
    """16 clients at once: all answered correctly, and some model calls held > 1 image."""

    def batch_histogram() -> tuple[float, float]:
        with api_server.client() as c:
            text = c.get("/metrics").text
        count = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("dandelion_inference_batch_size_count")
        )
        total = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("dandelion_inference_batch_size_sum")
        )
        return count, total

    images = _images(greenr_dir, 16)
    calls0, imgs0 = batch_histogram()

    def one(item: tuple[str, bytes]) -> dict:
        with api_server.client() as c:
            r = c.post("/predict", files={"file": item})
            assert r.status_code == 200, r.text
            return r.json()

    with cf.ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(one, images * 4))
    for body, (_, data) in zip(bodies, images * 4, strict=True):
        _check_against_reference(api_server, body, data)
    calls1, imgs1 = batch_histogram()
    assert imgs1 - imgs0 == 64
    assert calls1 - calls0 < 64  # at least one model call served several requests


def test_model_endpoint_describes_the_loaded_version(api_server: ApiServer) -> None:
    info = api_server.model()
    assert info["name"] == api_server.registry.name
    assert info["alias"] == "champion"
    assert info["state"] == "ready"
    assert info["version"] in api_server.registry.models
    assert info["uri"] == f"models:/{api_server.registry.name}/{info['version']}"
    assert info["feature_spec"]["image_size"] == FeatureSpec().image_size
    assert info["feature_spec"]["labels"] == ["dandelion", "grass"]
    assert info["metrics"] == {"test_accuracy": 0.7}
    assert info["dataset_version"] == "test"
    assert info["loaded_at"]


def test_logs_are_json_with_request_prediction_and_model_ids(
    api_server: ApiServer, greenr_dir: Path
) -> None:
    request_id = f"test-{uuid.uuid4().hex[:12]}"
    image = greenr_dir / "grass" / "00000003.jpg"
    with api_server.client() as c:
        r = c.post(
            "/predict",
            content=image.read_bytes(),
            headers={"content-type": "image/jpeg", "x-request-id": request_id},
        )
    assert r.headers["x-request-id"] == request_id
    prediction_id = r.json()["prediction_id"]
    # The access line is written once the response has gone out: wait for it.
    deadline = time.monotonic() + 30
    while True:
        lines = [entry for entry in api_server.logs() if entry.get("request_id") == request_id]
        if any(e["message"] == "request" for e in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    predictions = [e for e in lines if e["message"] == "prediction"]
    assert len(predictions) == 1
    assert predictions[0]["prediction_id"] == prediction_id
    assert predictions[0]["model_version"] == r.json()["model"]["version"]
    access = [e for e in lines if e["message"] == "request"]
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/predict"
    assert all({"ts", "level", "logger"} <= set(e) for e in lines)


def test_metrics_expose_the_contract(api_server: ApiServer) -> None:
    with api_server.client() as c:
        c.get("/does-not-exist")
        text = c.get("/metrics").text
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"
    }
    expected = {
        "dandelion_http_requests_total",
        "dandelion_http_request_duration_seconds_bucket",
        "dandelion_predictions_total",
        "dandelion_prediction_confidence_bucket",
        "dandelion_model_info",
        "dandelion_model_loaded",
        "dandelion_model_reload_failures_total",
        "dandelion_inference_batch_size_bucket",
        "dandelion_queue_depth",
        "dandelion_queue_capacity",
        "dandelion_queue_rejections_total",
        "dandelion_feedback_total",
        "dandelion_drift_psi",
        "dandelion_drift_share",
        "dandelion_drift_window_images",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    }
    assert expected <= names, expected - names
    assert 'dandelion_http_requests_total{method="GET",route="unmatched",status="404"}' in text
    assert 'route="/predict"' in text
    assert "dandelion_model_loaded 1.0" in text
    assert f'name="{api_server.registry.name}"' in text
    psi = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("dandelion_drift_psi{")
    ]
    assert len(psi) == 6 and all(np.isfinite(psi))
