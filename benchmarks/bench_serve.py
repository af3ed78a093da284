"""Serving speed and memory: each runtime's floor, the API on each, a naive server, one run.

* (a) floors — each in its own process (so its resident memory is its own): per image,
  ``Predictor.decode`` + one forward pass (batch 1) of the same registered model version, no
  HTTP, on TensorFlow (``keras``: the graph-compiled Keras model), ONNX Runtime FP32 and INT8;
  plus batch-32 throughput. The best a request can do on that runtime.
* (b) the API — ``python -m api`` (micro-batching, inference off the event loop) at 1 and 16
  concurrent clients, raw ``image/jpeg`` bodies over loopback HTTP, serving ONNX FP32, ONNX
  INT8 (the ``serving.precision`` tag the gate sets; with its FP32 recheck near a boundary,
  and alone) and Keras (``DANDELION_SERVING_RUNTIME=
  keras``: the API before the runtime artifacts); its resident memory after the load.
* (c) baseline — how typical projects serve: a Litestar app whose handler decodes with PIL
  and calls Keras' ``model.predict`` per request (in the thread pool), same clients.

The model is the served architecture (EfficientNet-Lite0 with its ImageNet weights,
normalisation inside the model, and a two-class head fitted on 100 reference photos'
features as training fits it), registered in an embedded MLflow registry with its runtime
artifacts exactly as training registers them (FP32 parity checked, INT8 calibrated on 100
reference photos); every server loads it from there. Images: the 400 reference JPEGs,
cycled. Targets: API p50 at c=1 <= 0.5x the TensorFlow floor's p50; API throughput at c=16
>= 6x the naive server's; API resident memory <= 400 MiB (after this load; ``bench -- soak``
holds the API under load for longer). Servers run one at a time on the same cores.

Explanations' cost (:mod:`benchmarks.explain_cost`): the ONNX floors and the API at c=1,
with and without ``explain=true``; target p50 with <= 1.15x without (``bench -- serve
explain`` measures only that: the model, two floors, two API runs).
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

from benchmarks import explain_cost
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
def _pixels(images: list[bytes]) -> Any:
    import numpy as np

    from dandelion_lib.core.features import to_model_input
    from dandelion_lib.core.images import decode_image

    return np.stack([to_model_input(decode_image(b)) for b in images]).astype(np.float32)


def _labels() -> list[int]:
    """The class (0 dandelion, 1 grass) of each of :func:`_images`' photos."""
    return [int(f.parent.name != "dandelion") for f in sorted(GREENR.glob("*/*.jpg"))]


def _build_model(pixels: Any, labels: list[int]) -> Any:
    """The served architecture: EfficientNet-Lite0 (ImageNet weights) + a head fitted, as
    training fits it (standardisation, then the default recipe's L2 logistic regression), on
    the backbone's features of reference photos: its confidences are a trained model's, which
    decide how many photos INT8 rechecks in FP32."""
    import numpy as np

    from dandelion_lib.training import model as model_lib
    from dandelion_lib.training.config import TrainConfig
    from dandelion_lib.training.fitting import HEAD_LEARNING_RATE, fit_head, one_hot

    recipe = TrainConfig()
    backbone = model_lib.build_backbone("efficientnet_lite0")
    features = backbone.model.predict(pixels, batch_size=16, verbose=0)
    head = model_lib.build_head(backbone.feature_dim, 2, l2=recipe.l2, adapt=features)
    y = one_hot(np.asarray(labels), 2)
    fit_head(
        head,
        features,
        y,
        (features, y),
        epochs=recipe.epochs,
        learning_rate=HEAD_LEARNING_RATE,
        patience=recipe.epochs + 1,
    )
    return model_lib.assemble(backbone, head)


def _register(workdir: Path, images: list[bytes]) -> str:
    import mlflow

    from dandelion_lib.core.config import Settings, cpu_limit
    from dandelion_lib.core.features import FeatureSpec
    from dandelion_lib.lifecycle.registry import configure_mlflow, log_keras_model, use_experiment
    from dandelion_lib.serving import runtime

    settings = Settings(workdir=workdir, experiment="bench-serve")
    client = configure_mlflow(settings)
    use_experiment(settings)  # artifacts under the temporary workdir, not ./mlruns
    pixels = _pixels(images[::4][:100])  # both classes, 100 photos
    model = _build_model(pixels, _labels()[::4][:100])
    size = FeatureSpec().image_size
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        out = Path(tmp) / runtime.DIR
        t0 = time.perf_counter()
        record = runtime.build(
            model,
            size,
            out,
            keras_forward=runtime.keras_forward(model, size),
            parity_pixels=_pixels(images[1::8][:48]),
            calibration_pixels=pixels,
            max_batch=settings.serving.inference_batch_max,
            threads=cpu_limit(),
        )
        print(
            f"runtime artifacts built in {time.perf_counter() - t0:.0f} s; parity against Keras "
            f"on 48 other photos: FP32 max |dp| {record.parity['fp32']['max_abs_diff']:.1e}, "
            f"INT8 max |dp| {record.parity['int8']['max_abs_diff']:.3f} "
            f"({record.parity['int8']['label_flips']} label flips)"
        )
        mv = log_keras_model(
            model,
            feature_spec=FeatureSpec().to_dict(),
            metrics={"test_accuracy": 0.5},
            dataset_version="bench",
            registered_model_name=MODEL_NAME,
            runtime_dir=out,
            runtime_record=record.to_dict(),
        )
    client.set_registered_model_alias(MODEL_NAME, "champion", mv.version)
    return f"models:/{MODEL_NAME}@champion"


def _set_precision(workdir: Path, precision: str) -> None:
    from dandelion_lib.core.config import Settings
    from dandelion_lib.lifecycle.registry import configure_mlflow

    client = configure_mlflow(Settings(workdir=workdir))
    version = client.get_model_version_by_alias(MODEL_NAME, "champion").version
    client.set_model_version_tag(MODEL_NAME, version, "serving.precision", precision)


def proc_status(pid: int) -> dict[str, str]:
    """The fields of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ``Threads``...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _rss_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, MiB."""
    fields = proc_status(pid)
    return int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["VmHWM"].split()[0]) / 1024.0


# --- (a) the floors -----------------------------------------------------------------------
def _floor(uri: str, runtime: str, precision: str) -> dict[str, float]:
    """In this (fresh) process: load, then batch-1 latency and batch-32 throughput."""
    import numpy as np

    from dandelion_lib.core.config import Settings
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import Predictor

    images = _images()
    settings = Settings()
    configure_mlflow(settings)
    t0 = time.perf_counter()
    predictor = Predictor.load(uri, settings, runtime=runtime, precision=precision)
    load_s = time.perf_counter() - t0
    assert (predictor.runtime, predictor.precision) == (runtime, precision), predictor
    rss_loaded = _rss_mib(os.getpid())[0]
    for data in images[:WARMUP]:
        x, _ = predictor.decode(data)
        predictor.predict_arrays(x[None])
    latencies = []
    start = time.perf_counter()
    for i in range(N_FLOOR):
        t1 = time.perf_counter()
        x, _ = predictor.decode(images[i % len(images)])
        predictor.predict_arrays(x[None])
        latencies.append(time.perf_counter() - t1)
    out = _stats(latencies, time.perf_counter() - start)
    batch = np.stack([predictor.decode(b)[0] for b in images[:32]])
    predictor.predict_arrays(batch)
    t1 = time.perf_counter()
    for _ in range(3):
        predictor.predict_arrays(batch)
    out["batch32_img_s"] = 96 / (time.perf_counter() - t1)
    out["load_s"] = load_s
    out["rss_loaded_mib"] = rss_loaded
    out["rss_mib"], out["hwm_mib"] = _rss_mib(os.getpid())
    return out


def _floor_in_subprocess(
    workdir: Path, uri: str, runtime: str, precision: str, kind: str = "floor"
) -> Any:
    import json
    import subprocess

    env = _env(workdir, 0)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_serve", kind, uri, runtime, precision],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"floor {runtime}/{precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- (c) the naive baseline server --------------------------------------------------------
def naive_app(uri: str, labels: tuple[str, ...]) -> Any:
    """What typical projects write: decode, ``model.predict`` per request, in a thread."""
    import io

    import anyio.to_thread
    import mlflow
    import numpy as np
    from litestar import Litestar, Request, get, post
    from PIL import Image

    model = mlflow.keras.load_model(uri)
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

    from dandelion_lib.core.config import Settings
    from dandelion_lib.lifecycle.registry import configure_mlflow

    settings = Settings()
    configure_mlflow(settings)
    uvicorn.run(naive_app(uri, settings.labels), host="127.0.0.1", port=port, log_level="warning")


# --- main ---------------------------------------------------------------------------------
def _row(name: str, s: dict[str, float]) -> str:
    return f"{name:<40} {s['n']:>5.0f} {s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['rps']:>9.1f}"


SERVERS = (("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int8 alone"), ("keras", "fp32"))
"""``int8 alone``: INT8 without the FP32 recheck near a boundary (and without its session)."""


def _api(
    workdir: Path, tmp: str, runtime: str, precision: str, images: list[bytes], only: str = ""
) -> Any:
    """The API serving ``runtime``/``precision``: c=1 and c=16, mean batch, resident memory
    (``only="explain"``: just the cost of explanations at c=1)."""
    precision, alone = precision.split()[0], precision.endswith("alone")
    _set_precision(workdir, precision)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = _server_options(workdir, port, tmp, f"api-{runtime}-{precision}")
    options["env"]["DANDELION_SERVING_RUNTIME"] = runtime
    if alone:
        options["env"]["DANDELION_INT8_RECHECK_MARGIN"] = "0"
        options["env"]["DANDELION_INT8_RECHECK_CONFIDENCE_MARGIN"] = "0"
    with running(["-m", "api"], f"{url}/health/ready", **options) as proc:
        import httpx

        serving = httpx.get(f"{url}/model", timeout=30).json()["serving"]
        assert (serving["runtime"], serving["precision"]) == (runtime, precision), serving
        if only == "explain":
            return explain_cost.api(url, images)
        c1 = _load(url, images, 1, N_C1)
        before = _batches(url)
        c16 = _load(url, images, 16, N_C16)
        after = _batches(url)
        rss, hwm = _rss_mib(proc.pid)
    mean_batch = (after[1] - before[1]) / max(after[0] - before[0], 1)
    return c1, c16, mean_batch, rss, hwm


def _explain_costs(workdir: Path, tmp: str, uri: str, images: list[bytes]) -> list[str]:
    """Explanations' cost on ONNX FP32 and INT8: floors, then the API at c=1."""
    onnx = ("fp32", "int8")
    floors = {pr: _floor_in_subprocess(workdir, uri, "onnx", pr, "explain-floor") for pr in onnx}
    apis = {pr: _api(workdir, tmp, "onnx", pr, images, only="explain") for pr in onnx}
    return explain_cost.report(floors, apis)


def main(part: str = "all") -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    images = _images()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp) / "work"
        os.environ["DANDELION_WORKDIR"] = str(workdir)
        t0 = time.perf_counter()
        uri = _register(workdir, images)
        print(f"model registered in {time.perf_counter() - t0:.0f} s: {uri} (EfficientNet-Lite0)")
        explained = _explain_costs(workdir, tmp, uri, images)
        if part == "explain":
            print(f"\ncores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
            print("\n" + "\n".join(explained))
            return

        floors = {
            (rt, pr): _floor_in_subprocess(workdir, uri, rt, pr)
            for rt, pr in (("keras", "fp32"), ("onnx", "fp32"), ("onnx", "int8"))
        }
        apis = {(rt, pr): _api(workdir, tmp, rt, pr, images) for rt, pr in SERVERS}

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        naive_cmd = ["-m", "benchmarks.bench_serve", "naive", uri, str(port)]
        with running(
            naive_cmd, f"{url}/ready", **_server_options(workdir, port, tmp, "naive")
        ) as proc:
            naive_c1 = _load(url, images, 1, N_C1)
            naive_c16 = _load(url, images, 16, N_C16 // 2)
            naive_rss = _rss_mib(proc.pid)

    tf_floor = floors[("keras", "fp32")]
    print(f"\ncores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    print("\n(a) floors, one process each: decode + forward")
    print(
        f"{'runtime':<14} {'p50 ms':>8} {'p99 ms':>8} {'vs TF':>7} {'b32 img/s':>10} "
        f"{'load s':>7} {'RSS MiB':>8} {'peak MiB':>9}"
    )
    for (rt, pr), f in floors.items():
        print(
            f"{rt + ' ' + pr:<14} {f['p50_ms']:>8.1f} {f['p99_ms']:>8.1f} "
            f"{tf_floor['p50_ms'] / f['p50_ms']:>6.2f}x {f['batch32_img_s']:>10.1f} "
            f"{f['load_s']:>7.1f} {f['rss_mib']:>8.0f} {f['hwm_mib']:>9.0f}"
        )
    print(f"\n{'':<40} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}")
    for (rt, pr), (c1, c16, batch, _rss, _hwm) in apis.items():
        print(_row(f"(b) api {rt} {pr} c=1", c1))
        print(_row(f"(b) api {rt} {pr} c=16 (batch {batch:.1f})", c16))
    print(_row("(c) naive model.predict c=1", naive_c1))
    print(_row("(c) naive model.predict c=16", naive_c16))
    print("\nresident memory after the load (MiB, now / peak):")
    for (rt, pr), (_, _, _, rss, hwm) in apis.items():
        print(f"  api {rt} {pr:<10} {rss:7.0f} / {hwm:.0f}")
    print(f"  naive      {naive_rss[0]:7.0f} / {naive_rss[1]:.0f}")

    print()
    for (rt, pr), (c1, c16, _, rss, _) in apis.items():
        if rt == "keras":
            continue
        latency = c1["p50_ms"] / tf_floor["p50_ms"]
        throughput = c16["rps"] / naive_c16["rps"]
        print(
            f"api {pr}: p50 c=1 / TF floor p50 {latency:5.2f}x (target <= 0.5x: "
            f"{'met' if latency <= 0.5 else 'NOT met'}); req/s c=16 / naive c=16 "
            f"{throughput:5.2f}x (target >= 6x: {'met' if throughput >= 6 else 'NOT met'}); "
            f"RSS {rss:.0f} MiB (target <= 400: {'met' if rss <= 400 else 'NOT met'})"
        )
    keras_api = apis[("keras", "fp32")]
    print(
        f"api keras fp32 (before): p50 c=1 / TF floor {keras_api[0]['p50_ms'] / tf_floor['p50_ms']:.2f}x; "
        f"req/s c=16 / naive {keras_api[1]['rps'] / naive_c16['rps']:.2f}x; RSS {keras_api[3]:.0f} MiB"
    )
    print("\n" + "\n".join(explained))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "naive":
        _serve_naive(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "floor":
        import json

        print(json.dumps(_floor(sys.argv[2], sys.argv[3], sys.argv[4])))
    elif len(sys.argv) == 5 and sys.argv[1] == "explain-floor":
        import json

        print(json.dumps(explain_cost.floor(sys.argv[2], sys.argv[4], _images())))
    else:
        main()
