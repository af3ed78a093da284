"""Serving speed: the API against its floor and against a naive server, in one run.

* (a) floor — in this process, per image: ``Predictor.decode`` + one forward pass of the
  same model (batch of 1), no HTTP. The best a request can do.
* (b) the API — ``python -m api`` (micro-batching, inference off the event loop) at 1 and
  16 concurrent clients, raw ``image/jpeg`` bodies over loopback HTTP.
* (c) baseline — how typical projects serve: a Litestar app whose handler decodes with
  PIL and calls ``model.predict`` per request (in the thread pool), same clients.

The model is the served architecture (EfficientNet-Lite0 with its ImageNet weights,
normalisation inside the model, and an untrained two-class head), registered in an
embedded MLflow registry; both servers load it from there. Images: the
400 reference JPEGs, cycled. Targets: API p50 at c=1 <= 1.5x the floor's p50; API
throughput at c=16 >= 3x the baseline's. Servers run one at a time on the same cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.process_support import free_port, running

ROOT = Path(__file__).resolve().parents[1]
GREENR = Path(os.environ.get("DANDELION_TEST_DATASET", ROOT.parent / "shared/datasets/greenr"))
MODEL_NAME = "dandelion-bench"
N_FLOOR = 150
N_C1 = 150
N_C16 = 480
WARMUP = 24


# --- helpers ------------------------------------------------------------------------------
def _images() -> list[bytes]:
    files = sorted(GREENR.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"reference images not found under {GREENR}")
    return [f.read_bytes() for f in files]


def _stats(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99_index = min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000.0,
        "p99_ms": ordered[p99_index] * 1000.0,
        "rps": len(ordered) / wall,
    }


def _env(workdir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DANDELION_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        DANDELION_WORKDIR=str(workdir),
        DANDELION_API_PORT=str(port),
        DANDELION_MODEL_NAME=MODEL_NAME,
        DANDELION_LOG_LEVEL="WARNING",
        DANDELION_RELOAD_INTERVAL_S="3600",
    )
    return env


def _server_options(workdir: Path, port: int, tmp: str, name: str = "api") -> dict[str, Any]:
    """Options of :func:`running`: ready on 200 only, 10 minutes to load the model."""
    return {
        "env": _env(workdir, port),
        "cwd": ROOT,
        "log": Path(tmp) / f"{name}.log",
        "timeout": 600,
        "ready": lambda status: status == 200,
    }


def _load(url: str, images: list[bytes], clients: int, total: int) -> dict[str, float]:
    """``total`` requests from ``clients`` keep-alive clients; per-request latency.

    The clients use the standard library's ``http.client`` (little CPU per request), so
    the two cores go to the server being measured rather than to the load generator.
    """
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[int] = []

    def worker(k: int) -> None:
        conn = HTTPConnection(host or "127.0.0.1", port, timeout=120)
        try:
            for i in range(k, WARMUP + total, clients):
                data = images[i % len(images)]
                start = time.perf_counter()
                conn.request("POST", "/predict", body=data, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200:
                    errors.append(response.status)
                elif i >= WARMUP:
                    with lock:
                        latencies.append(elapsed)
        finally:
            conn.close()

    # Warm-up requests (i < WARMUP) are sent but not timed; the wall clock covers all.
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {sorted(set(errors))}")
    return _stats(latencies, wall * total / (WARMUP + total))


def _batches(url: str) -> tuple[float, float]:
    """(model calls, images) so far, from the API's batch-size histogram."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("dandelion_inference_batch_size_"):
            name, value = line.split()
            values[name] = float(value)
    return (
        values["dandelion_inference_batch_size_count"],
        values["dandelion_inference_batch_size_sum"],
    )


# --- the model ----------------------------------------------------------------------------
def _build_model() -> Any:
    """The served architecture: EfficientNet-Lite0 (ImageNet weights) + a head (untrained)."""
    from dandelion_lib import model as model_lib

    backbone = model_lib.build_backbone("efficientnet_lite0")
    return model_lib.assemble(backbone, model_lib.build_head(backbone.feature_dim, 2))


def _register(workdir: Path) -> str:
    import mlflow

    from dandelion_lib.config import Settings
    from dandelion_lib.features import FeatureSpec
    from dandelion_lib.registry import configure_mlflow, log_keras_model

    settings = Settings(workdir=workdir)
    client = configure_mlflow(settings)
    mlflow.set_experiment("bench-serve")
    with mlflow.start_run():
        mv = log_keras_model(
            _build_model(),
            feature_spec=FeatureSpec().to_dict(),
            metrics={"test_accuracy": 0.5},
            dataset_version="bench",
            registered_model_name=MODEL_NAME,
        )
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    return f"models:/{MODEL_NAME}@champion"


# --- (a) the floor ------------------------------------------------------------------------
def _floor(uri: str, images: list[bytes]) -> dict[str, float]:
    from dandelion_lib.predict import Predictor

    predictor = Predictor.load(uri)
    for data in images[:WARMUP]:
        x, _ = predictor.decode(data)
        predictor.predict_arrays(x[None])
    latencies = []
    start = time.perf_counter()
    for i in range(N_FLOOR):
        t0 = time.perf_counter()
        x, _ = predictor.decode(images[i % len(images)])
        predictor.predict_arrays(x[None])
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, time.perf_counter() - start)


# --- (c) the naive baseline server --------------------------------------------------------
def naive_app(uri: str) -> Any:
    """What typical projects write: decode, ``model.predict`` per request, in a thread."""
    import io

    import anyio.to_thread
    import mlflow
    import numpy as np
    from litestar import Litestar, Request, get, post
    from PIL import Image

    model = mlflow.keras.load_model(uri)
    labels = ("dandelion", "grass")
    size = (int(model.input_shape[2]), int(model.input_shape[1]))

    def infer(data: bytes) -> dict[str, Any]:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize(size)
        x = np.asarray(img, dtype=np.float32)[None]
        probs = model.predict(x, verbose=0)[0]
        i = int(np.argmax(probs))
        return {"label": labels[i], "confidence": float(probs[i])}

    @post("/predict", status_code=200)
    async def predict(request: Request[Any, Any, Any]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(infer, await request.body())

    @get("/ready")
    async def ready() -> str:
        return "ok"

    return Litestar([predict, ready], logging_config=None)


def _serve_naive(uri: str, port: int) -> None:
    import uvicorn

    from dandelion_lib.config import Settings
    from dandelion_lib.registry import configure_mlflow

    configure_mlflow(Settings())
    uvicorn.run(naive_app(uri), host="127.0.0.1", port=port, log_level="warning")


# --- main ---------------------------------------------------------------------------------
def _row(name: str, s: dict[str, float]) -> str:
    return f"{name:<34} {s['n']:>5.0f} {s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['rps']:>9.1f}"


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = _images()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp) / "work"
        os.environ["DANDELION_WORKDIR"] = str(workdir)
        t0 = time.perf_counter()
        uri = _register(workdir)
        print(
            f"model registered in {time.perf_counter() - t0:.0f} s: {uri} (EfficientNet-Lite0 + head)"
        )
        floor = _floor(uri, images)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        results: dict[str, dict[str, float]] = {}
        with running(["-m", "api"], f"{url}/health/ready", **_server_options(workdir, port, tmp)):
            results["api c=1"] = _load(url, images, 1, N_C1)
            before = _batches(url)
            results["api c=16"] = _load(url, images, 16, N_C16)
            after = _batches(url)
        mean_batch = (after[1] - before[1]) / max(after[0] - before[0], 1)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        naive = ["-m", "benchmarks.bench_serve", "naive", uri, str(port)]
        with running(naive, f"{url}/ready", **_server_options(workdir, port, tmp, "naive")):
            results["baseline c=1"] = _load(url, images, 1, N_C1)
            results["baseline c=16"] = _load(url, images, 16, N_C16 // 2)

    print(f"\ncores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'':<34} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}")
    print(_row("(a) floor: decode + forward, batch 1", floor))
    for name in ("api c=1", "api c=16", "baseline c=1", "baseline c=16"):
        label = ("(b) " if name.startswith("api") else "(c) ") + name
        print(_row(label, results[name]))
    latency_ratio = results["api c=1"]["p50_ms"] / floor["p50_ms"]
    throughput_ratio = results["api c=16"]["rps"] / results["baseline c=16"]["rps"]
    print(
        f"\nAPI p50 at c=1 / floor p50:            {latency_ratio:5.2f}x  (target <= 1.5x: "
        f"{'met' if latency_ratio <= 1.5 else 'NOT met'})"
    )
    print(
        f"API req/s at c=16 / baseline at c=16:  {throughput_ratio:5.2f}x  (target >= 3x: "
        f"{'met' if throughput_ratio >= 3.0 else 'NOT met'})"
    )
    print(
        f"API req/s at c=16 / API at c=1:        "
        f"{results['api c=16']['rps'] / results['api c=1']['rps']:5.2f}x  (mean micro-batch at "
        f"c=16: {mean_batch:.1f} images per model call)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "naive":
        _serve_naive(sys.argv[2], int(sys.argv[3]))
    else:
        main()
