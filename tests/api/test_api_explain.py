"""``explain=true`` on ``POST /predict`` and ``/predict/batch``: where the model looked, from
the served ONNX runtime (INT8) in its own ``python -m api`` process (alias ``explain-test``),
checked against the same version loaded in this process; default answers keep their exact
fields; a bad value is a 400 and a version that cannot explain (the shared server's plain
Keras model) a 409, both problem+json."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dandelion_lib.core.config import Settings
from tests.api.conftest import (
    ApiServer,
    dataset_images,
    onnx_api,
)

ALIAS = "explain-test"
DEFAULT_FIELDS = {
    "prediction_id",
    "label",
    "probabilities",
    "confidence",
    "model",
    "latency_ms",
    "reason",
    "ood_score",
}
"""The fields of a default answer, exactly (no ``explanation``, not even ``null``)."""


@pytest.fixture(scope="module")
def explain_server(
    api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path
) -> Iterator[tuple[ApiServer, str]]:
    workdir = tmp_path_factory.mktemp("api-explain")
    with onnx_api(api_server, workdir, greenr_dir, ALIAS) as served:
        yield served


def _upload(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "image/jpeg")}


def test_bad_values_and_models_that_cannot_explain_are_problems(
    api_server: ApiServer, greenr_dir: Path
) -> None:
    photo = greenr_dir / "grass/00000000.jpg"
    with api_server.client() as c:
        plain = c.post("/predict", files=_upload(photo))
        assert plain.status_code == 200 and set(plain.json()) == DEFAULT_FIELDS
        off = c.post("/predict?explain=false", files=_upload(photo))
        assert off.status_code == 200 and set(off.json()) == DEFAULT_FIELDS
        for value in ("yes", "", "2", "x" * 500):
            r = c.post("/predict", params={"explain": value}, files=_upload(photo))
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            body = r.json()
            assert body["code"] == "invalid-parameter"
            assert body["detail"].startswith("explain must be true or false")
            assert "x" * 30 not in r.text  # a long value is not echoed back
        # the shared server's model is not backbone + head on ONNX: it cannot explain
        for path in ("/predict", "/predict/batch"):
            files = _upload(photo) if path == "/predict" else {"files": _upload(photo)["file"]}
            r = c.post(f"{path}?explain=true", files=files)
            assert r.status_code == 409, r.text
            body = r.json()
            assert body["code"] == "explanation-unavailable"
            assert "ONNX runtime" in body["detail"] and "ask without explain" in body["detail"]


def test_the_api_explains_on_request(
    explain_server: tuple[ApiServer, str], greenr_dir: Path
) -> None:
    import mlflow

    from dandelion_lib.serving.predict import Predictor

    server, version = explain_server
    photos = [p for p, _ in dataset_images(greenr_dir, parity=1)[5::40]]
    mlflow.set_tracking_uri(server.registry.tracking_uri)
    mlflow.set_registry_uri(server.registry.tracking_uri)
    uri = f"models:/{server.registry.name}/{version}"
    local = Predictor.load(uri, Settings(), runtime="onnx", precision="int8")
    expected = local.predict_bytes([p.read_bytes() for p in photos], explain=True)
    with server.client() as c:
        for path, reference in zip(photos, expected, strict=True):
            plain = c.post("/predict", files=_upload(path)).json()
            assert set(plain) == DEFAULT_FIELDS
            r = c.post("/predict?explain=true", files=_upload(path))
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == DEFAULT_FIELDS | {"explanation"}
            assert body["probabilities"] == plain["probabilities"]
            explanation = body["explanation"]
            top = max(body["probabilities"], key=body["probabilities"].get)
            assert explanation["class"] == top  # also for uncertain / unknown answers
            # the test model's backbone: 16 px block averages, a 22 x 22 grid at 352 px
            assert explanation["shape"] == [22, 22]
            grid = np.asarray(explanation["grid"])
            assert grid.shape == (22, 22) and grid.min() >= 0 and grid.max() <= 1
            assert reference.explanation is not None
            assert np.abs(grid - reference.explanation.grid).max() <= 1e-3
        # a batch: each prediction explained, a bad item still its own error
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:2]]
        files.append(("files", ("notes.txt", b"not an image", "text/plain")))
        batch = c.post("/predict/batch?explain=1", files=files).json()
        assert (batch["succeeded"], batch["failed"]) == (2, 1)
        for item in batch["results"][:2]:
            assert item["prediction"]["explanation"]["shape"] == [22, 22]
        assert "error" in batch["results"][2]
        default = c.post("/predict/batch", files=files[:1]).json()
        assert set(default["results"][0]["prediction"]) == DEFAULT_FIELDS
        schema = c.get("/schema/openapi.json").json()
    params = schema["paths"]["/predict"]["post"]["parameters"]
    assert {p["name"]: p["schema"]["type"] for p in params}["explain"] == "boolean"
    props = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert "explanation" in props
