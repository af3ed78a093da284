"""The API process serving each runtime: ONNX Runtime in the precision the gate chose (INT8,
then FP32 after the gate changes its mind), and Keras for a version without runtime
artifacts, each answer compared with the Keras model in this process; ``GET /model`` says
which runtime runs and why. While only ONNX versions were loaded the process has not loaded
TensorFlow at all.

Its own ``python -m api`` process (alias ``runtime-test``), so the shared server's state and
its TensorFlow are not involved. The settings the app is built with (``python -m api`` reads
them once at start) decide how its model runs, not the environment read later.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from api.app import create_app
from api.dependencies import provide_settings
from dandelion_lib.core.config import Settings
from dandelion_lib.serving.runtime import OnnxForward
from tests.api.conftest import (
    ApiServer,
    Registry,
    dataset_images,
    onnx_api,
)

ALIAS = "runtime-test"


@pytest.fixture(scope="module")
def runtime_server(
    api_server: ApiServer, tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path
) -> Iterator[tuple[ApiServer, str]]:
    workdir = tmp_path_factory.mktemp("api-runtime")
    with onnx_api(api_server, workdir, greenr_dir, ALIAS, reason="set by this test") as served:
        yield served


def _answers(server: ApiServer, photos: list[Path]) -> np.ndarray:
    out = []
    with server.client() as c:
        for path in photos:
            r = c.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            out.append([r.json()["probabilities"][k] for k in ("dandelion", "grass")])
    return np.asarray(out)


def _reference(registry: Registry, version: str, photos: list[Path]) -> np.ndarray:
    predictor = registry.predictor(version)
    preds = predictor.predict_bytes([p.read_bytes() for p in photos])
    return np.asarray([[p.probabilities[k] for k in ("dandelion", "grass")] for p in preds])


def _tensorflow_loaded(server: ApiServer) -> bool:
    """Whether the server process has loaded TensorFlow's libraries. (pandas and scikit-learn
    are not checked here: the full ``mlflow`` of this environment imports them; the API image
    carries ``mlflow-skinny`` and neither, and the Predictor reads the MLmodel file without
    them.)"""
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    return "libtensorflow" in maps or "_pywrap_tensorflow" in maps


def test_the_api_serves_each_runtime(
    runtime_server: tuple[ApiServer, str], greenr_dir: Path
) -> None:
    server, version = runtime_server
    registry = server.registry
    photos = [p for p, _ in dataset_images(greenr_dir, parity=1)[3::16]]
    reference = _reference(registry, version, photos)

    # 1. INT8, as the gate's tag says
    info = server.model()["serving"]
    assert (info["runtime"], info["precision"], info["note"]) == ("onnx", "int8", None)
    assert info["gate"] == {"precision": "int8", "reason": "set by this test"}
    int8 = _answers(server, photos)
    assert np.abs(int8 - reference).max() < 0.05  # quantized: close, not equal
    # INT8 runs beside its FP32 session, which answers the photos near a boundary
    recheck = server.model()["serving"]["recheck"]
    assert (recheck["ood_margin"], recheck["confidence_margin"]) == (1.5, 0.15)
    assert 0 <= recheck["rechecked"] <= len(photos) + 3  # the photos and the warm-up inputs
    assert not _tensorflow_loaded(server)

    # 2. The gate changes its mind: the same version is reloaded in FP32 (exact)
    registry.client().set_model_version_tag(registry.name, version, "serving.precision", "fp32")
    deadline_info = _wait_precision(server, "fp32")
    assert (deadline_info["runtime"], deadline_info["recheck"]) == ("onnx", None)
    fp32 = _answers(server, photos)
    assert np.abs(fp32 - reference).max() <= 1e-4
    assert not _tensorflow_loaded(server)

    # 3. A version without runtime artifacts is served by Keras, and GET /model says why
    plain = registry.register()
    registry.set_alias(plain, ALIAS)
    model = server.wait_for_version(plain, timeout=120)
    assert (model["serving"]["runtime"], model["serving"]["precision"]) == ("keras", "fp32")
    assert "has no runtime artifact" in model["serving"]["note"]
    keras_answers = _answers(server, photos)
    assert np.abs(keras_answers - _reference(registry, plain, photos)).max() <= 1e-5


def _wait_precision(server: ApiServer, precision: str, timeout: float = 60.0) -> dict[str, str]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = server.model()["serving"]
        if info["precision"] == precision:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"still serving {server.model()['serving']}")


def test_the_apps_settings_reach_the_predictor(
    runtime_server: tuple[ApiServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Settings the app is built with (its dependency ``settings``) load the served model:
    runtime, intra-op threads and ONNX batch size, whatever the environment says."""
    server, version = runtime_server
    registry = server.registry
    alias = "settings-test"
    registry.set_alias(version, alias)
    for key, value in {
        "DANDELION_SERVING_RUNTIME": "keras",
        "DANDELION_INFERENCE_THREADS": "3",
        "DANDELION_INFERENCE_BATCH_MAX": "7",
    }.items():
        monkeypatch.setenv(key, value)
    settings = Settings(
        workdir=tmp_path,
        tracking_uri=registry.tracking_uri,
        model_name=registry.name,
        model_alias=alias,
        serving_runtime="onnx",
        inference_threads=2,
        inference_batch_max=4,
    )
    try:
        app = create_app(settings)
        assert provide_settings(app.state) is settings
        models = app.state.services.models
        assert models.check().action == "loaded"
    finally:
        registry.client().delete_registered_model_alias(registry.name, alias)
    assert models.current is not None
    predictor = models.current.predictor
    assert (predictor.version, predictor.runtime, predictor.model) == (version, "onnx", None)
    forward = predictor._forward
    assert isinstance(forward, OnnxForward) and forward.max_batch == 4
    assert forward.session.get_session_options().intra_op_num_threads == 2
