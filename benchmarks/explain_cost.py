"""What explanations cost when served (used by ``bench_serve``; ``bench -- serve explain``
runs this part alone).

Per image, with and without an explanation, on the same registered version and runtime:

* floor: ``Predictor.decode`` + ``predict_arrays`` (batch 1) in one process, ONNX FP32 and
  INT8;
* API: ``POST /predict`` against ``POST /predict?explain=true`` at one client, raw JPEG
  bodies over loopback HTTP.

The two kinds of call alternate image by image (which comes first alternates too), so a
neighbour's load on the shared cores lands on both alike. Target: p50 with explanations
<= 1.15x p50 without.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

N = 150
WARMUP = 12
TARGET = 1.15


def _summary(plain: list[float], explained: list[float]) -> dict[str, float]:
    p50, e50 = statistics.median(plain) * 1000.0, statistics.median(explained) * 1000.0
    return {"n": len(plain), "plain_p50_ms": p50, "explain_p50_ms": e50, "ratio": e50 / p50}


def floor(uri: str, precision: str, images: list[bytes]) -> dict[str, float]:
    """In this process: the ONNX ``precision`` floor with and without explanations."""
    from dandelion_lib.core.config import Settings
    from dandelion_lib.lifecycle.registry import configure_mlflow
    from dandelion_lib.serving.predict import Predictor

    settings = Settings()
    configure_mlflow(settings)
    predictor = Predictor.load(uri, settings, runtime="onnx", precision=precision)
    assert predictor.explain_unavailable is None, predictor.explain_unavailable
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(WARMUP + N):
        data = images[i % len(images)]
        for explain in (False, True) if i % 2 else (True, False):
            start = time.perf_counter()
            x, _ = predictor.decode(data)
            (pred,) = predictor.predict_arrays(x[None], explain=explain)
            elapsed = time.perf_counter() - start
            assert (pred.explanation is not None) == explain
            if i >= WARMUP:
                times[explain].append(elapsed)
    return _summary(times[False], times[True])


def api(url: str, images: list[bytes]) -> dict[str, float]:
    """One keep-alive client alternating ``/predict`` and ``/predict?explain=true``."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for i in range(WARMUP + N):
            data = images[i % len(images)]
            for explain in (False, True) if i % 2 else (True, False):
                path = "/predict?explain=true" if explain else "/predict"
                start = time.perf_counter()
                conn.request("POST", path, body=data, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - start
                if response.status != 200 or (b'"explanation"' in body) != explain:
                    raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
                if i >= WARMUP:
                    times[explain].append(elapsed)
    finally:
        conn.close()
    return _summary(times[False], times[True])


def report(floors: dict[str, Any], apis: dict[str, Any]) -> list[str]:
    """The table and the verdict lines."""
    lines = [
        "explanations (?explain=true), alternating image by image, one client:",
        f"{'':<22} {'n':>5} {'p50 ms':>9} {'explained':>10} {'ratio':>7}",
    ]
    for kind, results in (("floor", floors), ("api c=1", apis)):
        for precision, r in results.items():
            lines.append(
                f"{kind + ' onnx ' + precision:<22} {r['n']:>5.0f} {r['plain_p50_ms']:>9.1f} "
                f"{r['explain_p50_ms']:>10.1f} {r['ratio']:>6.2f}x"
            )
    for precision, r in apis.items():
        verdict = "met" if r["ratio"] <= TARGET else "NOT met"
        lines.append(
            f"api {precision}: p50 with explanations / without {r['ratio']:.2f}x "
            f"(target <= {TARGET}x: {verdict})"
        )
    return lines
