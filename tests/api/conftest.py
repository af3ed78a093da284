"""Fixtures of the API tests: real models in a real MLflow registry, a real API server
process (``python -m api``), and a real PostgreSQL server.

The model is tiny but real and trained here: Rescaling + GlobalAveragePooling2D + a softmax
Dense layer whose weights come from a logistic regression on the mean colour of a quarter
of the reference images (about 70% accurate on the others). Every test module shares one API server process.

Its open-set variant (:func:`build_openset_model`) is the same computation assembled like
``dandelion_lib.training.model.assemble`` (pixels -> mean-colour backbone -> sub-model ``head``), so
the server computes its features; it ships a real :class:`~dandelion_lib.training.openset.OpenSetDetector`
fitted on those features of reference photos with ood-dev photos as negatives, and calibrated
on other reference photos (:func:`fit_openset`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import GREENR, OOD_DEV, ROOT, free_port, wait_http
from tests.process_support import stop

MODEL_NAME = "dandelion-api-test"
ADMIN_TOKEN = "test-admin-token"  # a throwaway token for the loopback server only
OOD_KINDS = ("objects", "daisy", "sunflowers", "tulips", "roses")


# --- models -----------------------------------------------------------------------------
def dataset_images(greenr: Path, parity: int) -> list[tuple[Path, int]]:
    """Half of the reference images (even or odd index), label 0=dandelion, 1=grass."""
    out = []
    for label, y in (("dandelion", 0), ("grass", 1)):
        files = sorted((greenr / label).glob("*.jpg"))
        out += [(p, y) for i, p in enumerate(files) if i % 2 == parity]
    return out


@dataclass
class TrainedParts:
    coef: np.ndarray  # (3,)
    intercept: float
    reference: dict[str, Any]
    features: np.ndarray  # (N, 3) mean colours of the photos fitted on
    labels: np.ndarray  # (N,) their labels, 0=dandelion, 1=grass


def mean_colour(data: bytes) -> np.ndarray:
    """The tiny models' features of one photo: its mean colour in [0, 1], as served."""
    from dandelion_lib.core.features import to_model_input
    from dandelion_lib.core.images import decode_image

    return np.asarray(to_model_input(decode_image(data)).mean(axis=(0, 1)) / 255.0)


def train_parts(greenr: Path) -> TrainedParts:
    """Fit the tiny model's weights and the drift reference on the training half."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from dandelion_lib.core.features import image_stats, to_model_input
    from dandelion_lib.core.images import decode_image
    from dandelion_lib.lifecycle.monitoring import build_reference

    xs, ys, stats = [], [], []
    for path, y in dataset_images(greenr, parity=0)[::2]:
        img = decode_image(path.read_bytes())
        xs.append(to_model_input(img).mean(axis=(0, 1)) / 255.0)
        ys.append(y)
        stats.append(image_stats(img))
    x, y = np.asarray(xs), np.asarray(ys)
    lr = LogisticRegression(C=100.0).fit(x, y)
    reference = build_reference(pd.DataFrame(stats))
    return TrainedParts(lr.coef_[0], float(lr.intercept_[0]), reference, x, y)


def _dense_weights(coef: np.ndarray, intercept: float) -> list[np.ndarray]:
    """Dense(2, softmax) weights with p(grass) = sigmoid(coef.x + intercept)."""
    w = np.stack([-coef / 2.0, coef / 2.0], axis=1).astype("float32")
    b = np.asarray([-intercept / 2.0, intercept / 2.0], dtype="float32")
    return [w, b]


def build_tiny_model(coef: np.ndarray, intercept: float) -> Any:
    """Rescaling -> GlobalAveragePooling2D -> Dense(2, softmax): p(grass) = sigmoid(coef.x + b)."""
    import keras

    from dandelion_lib.core.features import FeatureSpec

    size = FeatureSpec().image_size
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights(_dense_weights(coef, intercept))
    return model


def build_openset_model(coef: np.ndarray, intercept: float, *, blocks: bool = False) -> Any:
    """The tiny model assembled as ``dandelion_lib.training.model.assemble`` does: pixels -> backbone
    (Rescaling -> GlobalAveragePooling2D: the mean colour) -> ``head`` (Dense softmax), so the
    Predictor computes its features and scores them with the open-set detector.

    ``blocks``: the same mean colour as an average of 16x16-block averages. ONNX Runtime
    sums all 123,904 pixels of one global average in float32 one after another, which moves
    this model's steep probabilities by ~2e-3 (more than the FP32 parity rule allows); two
    short averages keep the export exact, as the real backbone's 11x11 pooling is."""
    import keras

    from dandelion_lib.core.features import FeatureSpec

    size = FeatureSpec().image_size
    pixels = keras.Input((size, size, 3), name="pixels")
    scaled = keras.layers.Rescaling(1.0 / 255.0)(pixels)
    if blocks:
        scaled = keras.layers.AveragePooling2D(pool_size=16)(scaled)
    pooled = keras.layers.GlobalAveragePooling2D()(scaled)
    backbone = keras.Model(pixels, pooled, name="mean_colour")
    features = keras.Input((3,), name="features")
    dense = keras.layers.Dense(2, activation="softmax")
    head = keras.Model(features, dense(features), name="head")
    dense.set_weights(_dense_weights(coef, intercept))
    inputs = keras.Input((size, size, 3), name="pixels")
    return keras.Model(inputs, head(backbone(inputs, training=False)), name="dandelion_tiny")


@dataclass
class OpenSetParts:
    """A fitted, calibrated detector on the tiny models' features and two photos chosen by it."""

    detector: Any  # dandelion_lib.training.openset.OpenSetDetector
    unknown_photo: Path
    """An ood-dev object photo never fitted on, scoring far above the threshold."""
    in_domain_photo: Path
    """A reference photo never fitted or calibrated on, far below the threshold, confident."""


def fit_openset(greenr: Path, parts: TrainedParts, ood: Path = OOD_DEV) -> OpenSetParts:
    """Fit the default (``logistic``) detector on the training photos' features with a
    quarter of each ood-dev folder as negatives, calibrate it on other reference photos,
    and pick the photos the tests send (about 150 photos decoded)."""
    from dandelion_lib.training.openset import OpenSetDetector

    if not ood.is_dir():
        pytest.fail(f"ood-dev not found at {ood} (set DANDELION_OOD_DATASET)")
    negatives = [
        mean_colour(p.read_bytes())
        for kind in OOD_KINDS
        for p in sorted((ood / kind).glob("*.jpg"))[0 :: 4 if kind == "objects" else 7]
    ]
    detector = OpenSetDetector(method="logistic")
    detector.fit(parts.features, parts.labels, negatives=np.asarray(negatives))
    held_out = dataset_images(greenr, parity=1)
    detector.calibrate(np.asarray([mean_colour(p.read_bytes()) for p, _ in held_out[::4]]))
    assert detector.threshold is not None

    objects = sorted((ood / "objects").glob("*.jpg"))[2::8]  # never among the negatives
    scores = detector.score(np.asarray([mean_colour(p.read_bytes()) for p in objects]))
    unknown = objects[int(np.argmax(scores))]
    assert scores.max() > detector.threshold + 0.2, "no clearly out-of-domain object photo"

    candidates = [p for p, _ in held_out[1::8]]
    feats = np.asarray([mean_colour(p.read_bytes()) for p in candidates])
    z = feats @ parts.coef + parts.intercept
    confidence = 1.0 / (1.0 + np.exp(-np.abs(z)))  # the head's top probability
    margin = np.where(confidence >= 0.75, detector.threshold - detector.score(feats), -np.inf)
    assert margin.max() > 0.2, "no clearly in-domain, confident reference photo"
    return OpenSetParts(detector, unknown, candidates[int(np.argmax(margin))])


@dataclass
class Registry:
    """Registers real model versions in the MLflow server and moves aliases."""

    tracking_uri: str
    s3_endpoint: str
    parts: TrainedParts
    name: str = MODEL_NAME
    models: dict[str, Any] = field(default_factory=dict)  # version -> keras model
    detectors: dict[str, Any] = field(default_factory=dict)  # version -> open-set detector

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def register(self, scale: float = 1.0) -> str:
        """Log and register a new version (``scale`` changes its weights); returns it."""
        return self._log(build_tiny_model(self.parts.coef * scale, self.parts.intercept * scale))

    def register_openset(self, detector: Any) -> str:
        """Log and register the open-set variant with its ``detector``; returns the version."""
        model = build_openset_model(self.parts.coef, self.parts.intercept)
        return self._log(model, detector)

    def register_with_runtime(self, detector: Any, photos: list[Path]) -> str:
        """The open-set variant registered as training registers it: with its ONNX Runtime
        artifacts (FP32 checked against Keras on ``photos``, INT8 calibrated on them)."""
        from dandelion_lib.core.config import Settings
        from dandelion_lib.core.features import FeatureSpec, to_model_input
        from dandelion_lib.core.images import decode_image
        from dandelion_lib.serving import runtime

        model = build_openset_model(self.parts.coef, self.parts.intercept, blocks=True)
        spec = FeatureSpec()
        pixels = np.stack([to_model_input(decode_image(p.read_bytes())) for p in photos])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / runtime.DIR
            record = runtime.build(
                model,
                spec.image_size,
                out,
                keras_forward=runtime.keras_forward(model, spec.image_size),
                parity_pixels=pixels.astype(np.float32),
                calibration_pixels=pixels.astype(np.float32),
                max_batch=Settings().serving.inference_batch_max,
            )
            return self._log(model, detector, runtime_dir=out, runtime_record=record.to_dict())

    def _log(self, model: Any, detector: Any = None, **runtime: Any) -> str:
        import mlflow

        from dandelion_lib.core.features import FeatureSpec
        from dandelion_lib.lifecycle.registry import log_keras_model

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mlflow.set_experiment("dandelion-api-test")
        with mlflow.start_run():
            mv = log_keras_model(
                model,
                feature_spec=FeatureSpec().to_dict(),
                drift_reference=self.parts.reference,
                metrics={"test_accuracy": 0.7},
                dataset_version="test",
                registered_model_name=self.name,
                detector=detector,
                **runtime,
            )
        self.models[str(mv.version)] = model
        if detector is not None:
            self.detectors[str(mv.version)] = detector
        return str(mv.version)

    def register_broken(self) -> str:
        """A version whose stored ``model.keras`` is garbage (as after a bad upload)."""
        import boto3

        version = self.register()
        source = self.client().get_model_version(self.name, version).source
        model_id = source.rstrip("/").split("/")[-1]  # models:/m-<id>
        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")
        hits = []
        for bucket in s3.list_buckets()["Buckets"]:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
            for page in pages:
                for obj in page.get("Contents", []):
                    if model_id in obj["Key"] and obj["Key"].endswith("model.keras"):
                        hits.append((bucket["Name"], obj["Key"]))
        assert hits, f"stored model file of {source} not found"
        for bucket_name, key in hits:
            s3.put_object(Bucket=bucket_name, Key=key, Body=b"this is not a keras archive")
        self.models.pop(version)
        return version

    def set_alias(self, version: str, alias: str = "champion") -> None:
        self.client().set_registered_model_alias(self.name, alias, version)

    def predictor(self, version: str) -> Any:
        """An in-process Predictor on the same Keras model (the reference answer)."""
        from dandelion_lib.core.features import FeatureSpec
        from dandelion_lib.serving.predict import Predictor

        return Predictor(
            model=self.models[version],
            spec=FeatureSpec(),
            version=version,
            detector=self.detectors.get(version),
        )


@pytest.fixture(scope="session")
def trained_parts(greenr_dir: Path) -> TrainedParts:
    return train_parts(greenr_dir)


@pytest.fixture(scope="session")
def registry(mlflow_server: str, s3_server: str, trained_parts: TrainedParts) -> Registry:
    return Registry(mlflow_server, s3_server, trained_parts)


# --- the API server process -------------------------------------------------------------
@pytest.fixture(scope="module")
def champion(registry: Registry) -> str:
    """A registered version of the test model with the ``champion`` alias (for a module that
    starts its own API processes)."""
    version = registry.register()
    registry.set_alias(version)
    return version


@dataclass
class ApiServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    workdir: Path
    env: dict[str, str]
    registry: Registry
    before_ready: dict[str, Any] = field(default_factory=dict)
    first_version: str = ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def logs(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far (non-JSON lines, e.g. from TensorFlow, skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def model(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/model", timeout=30).json()

    def wait_for_version(self, version: str, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.model()
            if info["version"] == version:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"server did not load version {version}: {self.model()}")


def api_env(workdir: Path, port: int, tracking_uri: str, **overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DANDELION_") or k == "DANDELION_TEST_DATASET"
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "DANDELION_WORKDIR": str(workdir),
            "DANDELION_API_HOST": "127.0.0.1",
            "DANDELION_API_PORT": str(port),
            "DANDELION_TRACKING_URI": tracking_uri,
            "DANDELION_MODEL_NAME": MODEL_NAME,
            "DANDELION_MODEL_ALIAS": "champion",
            "DANDELION_RELOAD_INTERVAL_S": "1",
            "DANDELION_ADMIN_TOKEN": ADMIN_TOKEN,
            "DANDELION_LOG_LEVEL": "INFO",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update(overrides)
    return env


def start_api(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = log_path.open("wb")  # closed by the caller, after the process ends
    return subprocess.Popen(
        [sys.executable, "-m", "api"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_api(proc: subprocess.Popen) -> None:
    stop(proc, timeout=30, sig=signal.SIGINT)


@contextlib.contextmanager
def onnx_api(
    api_server: ApiServer, workdir: Path, greenr: Path, alias: str, **tags: str
) -> Iterator[tuple[ApiServer, str]]:
    """Its own ``python -m api`` process serving, under ``alias``, a new version with the
    ONNX runtime artifacts and the open-set detector, tagged to be served in INT8 (plus
    ``serving.<name>`` ``tags``); yields the server and the version, then stops it and
    removes the alias."""
    registry: Registry = api_server.registry
    parts = fit_openset(greenr, registry.parts)
    photos = [p for p, _ in dataset_images(greenr, parity=0)[1::8]]
    version = registry.register_with_runtime(parts.detector, photos)
    client = registry.client()
    for name, value in {"precision": "int8", **tags}.items():
        client.set_model_version_tag(registry.name, version, f"serving.{name}", value)
    registry.set_alias(version, alias)
    port = free_port()
    env = api_env(workdir, port, registry.tracking_uri, DANDELION_MODEL_ALIAS=alias)
    proc = start_api(env, workdir / "server.log")
    server = ApiServer(
        f"http://127.0.0.1:{port}", proc, workdir / "server.log", workdir, env, registry
    )
    try:
        wait_http(f"{server.url}/health/live", timeout=120, proc=proc)
        server.wait_for_version(version, timeout=120)
        yield server, version
    finally:
        stop_api(proc)
        client.delete_registered_model_alias(registry.name, alias)


@pytest.fixture(scope="session")
def api_server(
    request: pytest.FixtureRequest, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """``python -m api`` against the MLflow server, shared by every API test module.

    Started before any version has the ``champion`` alias, so its not-ready answers are
    recorded in ``before_ready``; then the alias is set and the server picks it up.
    The process starts first, so its start-up overlaps training the first model here.
    """
    workdir = tmp_path_factory.mktemp("api")
    port = free_port()
    env = api_env(workdir, port, mlflow_server)
    log_path = workdir / "server.log"
    proc = start_api(env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        registry: Registry = request.getfixturevalue("registry")
        version = registry.register()
    except BaseException:
        stop_api(proc)
        raise
    server = ApiServer(url, proc, log_path, workdir, env, registry)
    try:
        wait_http(f"{url}/health/live", timeout=120, proc=proc)
        deadline = time.monotonic() + 180
        while server.model()["state"] == "starting":  # first registry check still running
            assert time.monotonic() < deadline, "the first registry check never finished"
            time.sleep(0.3)
        ready = httpx.get(f"{url}/health/ready", timeout=30)
        image = (GREENR / "grass/00000000.jpg").read_bytes()
        predict = httpx.post(f"{url}/predict", files={"file": ("g.jpg", image)}, timeout=30)
        server.before_ready = {
            "ready_status": ready.status_code,
            "ready_body": ready.json(),
            "predict_status": predict.status_code,
            "predict_headers": dict(predict.headers),
            "predict_body": predict.json(),
            "model": server.model(),
        }
        registry.set_alias(version)
        server.wait_for_version(version, timeout=180)
        server.first_version = version
        yield server
    finally:
        stop_api(proc)


# --- PostgreSQL -------------------------------------------------------------------------
def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / name).exists():
            return str(base / name)
    pytest.fail(
        f"PostgreSQL's {name} not found: install it with `bash scripts/install-system-deps.sh`"
    )


class PgServer:
    """A real PostgreSQL server (Debian's packages) in a temp dir on a free loopback port;
    it can be stopped and started again on the same port and data (a database outage).

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user.
    """

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.base = Path(tempfile.mkdtemp(prefix="dandelion-pg-"))
        self.data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            shutil.chown(sock, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE dandelion_feedback")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/dandelion_feedback"

    def _run(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.prefix, *args], check=check, capture_output=True, cwd=self.base)

    def start(self) -> None:
        log = str(self.base / "pg.log")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", self.opts, "-l", log, "-w", "start")

    def stop(self, check: bool = True) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop", check=check)

    def remove(self) -> None:
        self.stop(check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of a :class:`PgServer` shared by the tests of a session."""
    server = PgServer()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def unique_id() -> str:
    return uuid.uuid4().hex[:8]
