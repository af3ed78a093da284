"""Micro-batching and back-pressure, in process with a real (tiny) Keras model."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.app import create_app
from api.metrics import ApiMetrics
from api.services.inference import InferenceQueue, QueueFullError
from dandelion_lib.core.config import Settings
from dandelion_lib.core.features import FeatureSpec
from dandelion_lib.serving.predict import Predictor
from tests.api.conftest import MODEL_NAME, ApiServer, Registry, TrainedParts, build_tiny_model
from tests.conftest import free_port


@pytest.fixture(scope="module")
def predictors(trained_parts: TrainedParts) -> tuple[Predictor, Predictor]:
    a = build_tiny_model(trained_parts.coef, trained_parts.intercept)
    b = build_tiny_model(-trained_parts.coef, -trained_parts.intercept)
    return (
        Predictor(model=a, spec=FeatureSpec(), version="a"),
        Predictor(model=b, spec=FeatureSpec(), version="b"),
    )


def _arrays(greenr_dir: Path, predictor: Predictor, n: int) -> list[np.ndarray]:
    paths = sorted(greenr_dir.glob("*/*.jpg"))[::13][:n]
    return [predictor.decode(p.read_bytes())[0] for p in paths]


def _count(metrics: ApiMetrics) -> tuple[float, float]:
    samples = {s.name: s.value for m in metrics.registry.collect() for s in m.samples}
    return (
        samples["dandelion_inference_batch_size_count"],
        samples["dandelion_inference_batch_size_sum"],
    )


def test_admission_is_bounded(predictors: tuple[Predictor, Predictor]) -> None:
    metrics = ApiMetrics()
    queue = InferenceQueue(metrics, capacity=3)
    with queue.admit(2), queue.admit(1):
        assert queue.depth == 3
        with pytest.raises(QueueFullError) as err, queue.admit(1):
            pass
        assert err.value.retry_after >= 1
    assert queue.depth == 0
    with queue.admit(3):  # room again once released
        pass
    samples = {s.name: s.value for m in metrics.registry.collect() for s in m.samples}
    assert samples["dandelion_queue_rejections_total"] == 1
    assert samples["dandelion_queue_capacity"] == 3


def test_concurrent_items_share_model_calls_and_keep_their_version(
    predictors: tuple[Predictor, Predictor], greenr_dir: Path
) -> None:
    """32 concurrent items of two model versions: fewer model calls than items, and every
    item answered by the version it was decoded for (what makes hot swaps safe)."""
    pa, pb = predictors
    arrays = _arrays(greenr_dir, pa, 16)
    expected_a = pa.predict_arrays(np.stack(arrays))
    expected_b = pb.predict_arrays(np.stack(arrays))
    metrics = ApiMetrics()
    queue = InferenceQueue(metrics, max_batch=64, wait_ms=20, capacity=64)
    queue.start()

    async def one(array: np.ndarray, predictor: Predictor) -> float:
        with queue.admit(1) as ticket:
            await asyncio.sleep(0)  # let the others be admitted, as during decoding
            (pred,) = await queue.predict(ticket, [array], predictor)
            return pred.probabilities["grass"]

    async def main() -> list[float]:
        jobs = [one(a, pa) for a in arrays] + [one(a, pb) for a in arrays]
        return list(await asyncio.gather(*jobs))

    try:
        got = asyncio.run(main())
    finally:
        queue.stop()
    want = [p.probabilities["grass"] for p in expected_a + expected_b]
    assert got == pytest.approx(want, abs=1e-5)
    calls, items = _count(metrics)
    assert items == 32
    assert calls < 32


def test_a_lone_request_does_not_wait_for_a_batch(
    predictors: tuple[Predictor, Predictor], greenr_dir: Path
) -> None:
    """With nothing else admitted, the worker runs at once instead of waiting wait_ms."""
    pa, _ = predictors
    (array,) = _arrays(greenr_dir, pa, 1)
    queue = InferenceQueue(ApiMetrics(), max_batch=32, wait_ms=2000, capacity=8)
    queue.start()

    async def one() -> float:
        with queue.admit(1) as ticket:
            start = time.perf_counter()
            await queue.predict(ticket, [array], pa)
            return time.perf_counter() - start

    try:
        elapsed = asyncio.run(one())
    finally:
        queue.stop()
    assert elapsed < 1.5  # far below the 2 s batching window


@pytest.mark.faults
def test_full_queue_answers_503_with_retry_after(
    api_server: ApiServer, registry: Registry, tmp_path: Path, greenr_dir: Path
) -> None:
    """A queue of 1 under 12 concurrent clients: some 503 + Retry-After, the rest 200.

    The app runs in this process under a real uvicorn server (the test client would
    serialise the requests)."""
    import uvicorn

    settings = Settings(
        workdir=tmp_path / "work",
        tracking_uri=registry.tracking_uri,
        model_name=MODEL_NAME,
        queue_size=1,
        reload_interval_s=60,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    # A large photo (slower to decode) keeps the first request busy while the others arrive.
    photo = Image.open(greenr_dir / "grass" / "00000030.jpg").convert("RGB").resize((2400, 1800))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=95)
    image = buf.getvalue()
    try:
        deadline = time.monotonic() + 120
        while not server.started or httpx.get(f"{url}/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        barrier = threading.Barrier(12)

        def one(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as c:
                barrier.wait()
                return c.post("/predict", content=image, headers={"content-type": "image/jpeg"})

        with cf.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(12)))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.should_exit = True
        thread.join(30)
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["code"] == "queue-full"
            assert int(r.headers["retry-after"]) >= 1
    rejected = statuses.count(503)
    assert f"dandelion_queue_rejections_total {float(rejected)}" in metrics
