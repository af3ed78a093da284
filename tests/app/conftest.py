"""Fixtures of the web app tests: a real Voila server and a Chromium-family browser (Playwright)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_http
from tests.process_support import stop

# Debian's Chromium; GitHub's Ubuntu runners ship Google Chrome instead (Ubuntu's `chromium`
# package is a snap stub that cannot run there). DANDELION_TEST_BROWSER overrides both.
BROWSERS = ("/usr/bin/chromium", "/usr/bin/google-chrome")


def browser_path() -> str | None:
    """The Chromium-family browser the browser tests drive, or None when there is none."""
    chosen = os.environ.get("DANDELION_TEST_BROWSER")
    if chosen:
        return shutil.which(chosen) or (chosen if Path(chosen).exists() else None)
    return next((b for b in BROWSERS if Path(b).exists()), None)


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "app"


VISIT_VALUE = re.compile(r'"dandelion_visit=([^;"]+);')


def upload_entry(name: str, data: bytes) -> dict[str, Any]:
    """One file as the app's ``FileUpload`` widget holds it in its ``value``."""
    return {
        "name": name,
        "type": "",
        "size": len(data),
        "content": memoryview(data),
        "last_modified": dt.datetime.now(dt.UTC),
    }


@dataclass(frozen=True)
class Answered:
    """A photo the model ``dandelion`` (version ``version``) answered ``answer`` with
    ``confidence``, and the label the user gave it (``correct``)."""

    image: bytes
    answer: str
    correct: str
    version: str
    confidence: float = 0.8


def add_feedback(workdir: Path, items: list[Answered], prefix: str) -> list[str]:
    """Pending feedback with each photo in ``workdir``'s embedded feedback database, in the
    order given (prediction ids ``<prefix>-<n>``); returns the feedback ids."""
    import hashlib

    from dandelion_lib.core.config import Settings
    from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord

    store = FeedbackStore.from_settings(Settings(workdir=workdir))
    ids = []
    try:
        for n, item in enumerate(items):
            other = "grass" if item.answer == "dandelion" else "dandelion"
            prediction = PredictionRecord(
                prediction_id=f"{prefix}-{n}",
                label=item.answer,
                top_label=item.answer,
                confidence=item.confidence,
                probabilities={item.answer: item.confidence, other: 1 - item.confidence},
                model_name="dandelion",
                model_version=item.version,
                image_sha256=hashlib.sha256(item.image).hexdigest(),
            )
            store.record_predictions([prediction])
            feedback = store.add_feedback(prediction.prediction_id, item.correct, item.image)
            ids.append(feedback.feedback_id)
    finally:
        store.close()
    return ids


def visit_cookies(url: str) -> dict[str, str]:
    """The visit cookie a browser gets from the app's gate page (its script sets it), taken
    from the page as a script would: plain HTTP that then starts kernels like a browser."""
    gate = httpx.get(url, timeout=30)
    match = VISIT_VALUE.search(gate.text)
    assert gate.status_code == 200 and match, gate.text[:500]
    return {"dandelion_visit": match.group(1)}


def dead_url() -> str:
    """An http URL on loopback where nothing listens (an API that is down)."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def voila_server(
    api_url: str, log_dir: Path, env: dict[str, str] | None = None, **settings: Any
) -> Iterator[str]:
    """``python -m dashboards.serve`` (the production launcher) on a free port; yields its URL.

    ``settings`` become ``DANDELION_<NAME>`` variables (e.g. ``app_max_kernels=1``); ``env``
    adds other environment variables.
    """
    port = free_port()
    env = {
        **os.environ,
        **(env or {}),
        "DANDELION_API_URL": api_url,
        "DANDELION_APP_HOST": "127.0.0.1",
        "DANDELION_APP_PORT": str(port),
        "DANDELION_APP_HEALTH_INTERVAL_S": "1",
    }
    env.update({f"DANDELION_{k.upper()}": str(v) for k, v in settings.items()})
    log_dir.mkdir(parents=True, exist_ok=True)
    with serve_process([], env, log_dir / f"voila-{port}.log", port) as url:
        yield url


@contextmanager
def serve_process(
    args: list[str], env: dict[str, str], log_path: Path, port: int, timeout: float = 60
) -> Iterator[str]:
    """``python -m dashboards.serve ARGS`` with ``env``, its output in ``log_path``; yields its
    URL once ``/health/live`` answers (a probe that starts no kernel)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dashboards.serve", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/health/live", timeout=timeout, proc=proc)
            yield url
        finally:
            stop(proc, timeout=30, sig=signal.SIGTERM)  # Voila shuts its kernels down on SIGTERM


@pytest.fixture
def voila(tmp_path: Path) -> Callable[..., Any]:
    """Factory: ``with voila(api_url, **settings) as url: ...``."""

    def start(api_url: str, env: dict[str, str] | None = None, **settings: Any) -> Any:
        return voila_server(api_url, tmp_path, env, **settings)

    return start


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium (or Google Chrome) driven by Playwright (headless)."""
    executable = browser_path()
    if executable is None:
        pytest.fail(
            f"no browser among {', '.join(BROWSERS)} (or DANDELION_TEST_BROWSER): "
            "run `bash scripts/install-system-deps.sh`"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; requests to outside hosts (e.g. Voila's icon CDN) fail at once, offline."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    pg.route(
        lambda url: not url.startswith(("http://127.0.0.1", "data:", "blob:")),
        lambda route: route.abort(),
    )
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.page_errors = errors  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        context.close()


def open_app(page: Any, url: str) -> None:
    """Open the app and wait until its widgets are rendered."""
    page.goto(url, wait_until="domcontentloaded", timeout=90_000)
    page.wait_for_selector(".dl-app", timeout=90_000)


# --- the real API with a real registered model ---------------------------------------------
APP_MODEL = "dandelion-app-test"  # its own registered model: API tests move their aliases


@dataclass
class AppApi:
    """A running ``python -m api`` serving ``APP_MODEL@champion`` from the MLflow server."""

    url: str
    workdir: Path
    registry: Any  # tests.api.conftest.Registry
    version: str
    log_path: Path
    openset: Any  # tests.api.conftest.OpenSetParts of the served model
    before_ready: dict[str, Any] = field(default_factory=dict)

    def feedback_store(self) -> Any:
        """The API's own feedback database (SQLite in its work dir)."""
        from dandelion_lib.core import config
        from dandelion_lib.data import feedback

        return feedback.FeedbackStore.from_settings(config.Settings(workdir=self.workdir))


@dataclass
class AppModel:
    registry: Any
    version: str
    openset: Any  # tests.api.conftest.OpenSetParts: the detector and the photos it picked


@pytest.fixture(scope="session")
def app_model(mlflow_server: str, s3_server: str, greenr_dir: Path) -> AppModel:
    """A real model registered as ``APP_MODEL`` (no alias): the API tests' tiny colour model
    assembled as backbone + head with a real open-set detector, so it answers ``unknown``
    for photos of neither class, as production models do."""
    from tests.api.conftest import Registry, fit_openset, train_parts

    registry = Registry(mlflow_server, s3_server, train_parts(greenr_dir), name=APP_MODEL)
    openset = fit_openset(greenr_dir, registry.parts)
    return AppModel(registry, registry.register_openset(openset.detector), openset)


@contextmanager
def api_process(model: AppModel, workdir: Path, port: int | None = None) -> Iterator[AppApi]:
    """Start ``python -m api`` (the API tests' launcher) for ``APP_MODEL``; yields when live."""
    from tests.api.conftest import api_env, start_api, stop_api

    port = port or free_port()
    env = api_env(workdir, port, model.registry.tracking_uri, DANDELION_MODEL_NAME=APP_MODEL)
    log_path = workdir / "api.log"
    proc = start_api(env, log_path)
    api = AppApi(
        f"http://127.0.0.1:{port}", workdir, model.registry, model.version, log_path, model.openset
    )
    try:
        wait_http(f"{api.url}/health/live", timeout=120, proc=proc)
        yield api
    finally:
        stop_api(proc)


def wait_ready(url: str, timeout: float = 180.0) -> None:
    from dashboards.client import ApiClient

    deadline = time.monotonic() + timeout
    with ApiClient(url) as client:
        while not client.health().ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"API at {url} not ready after {timeout}s")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def app_api(
    app_model: AppModel, tmp_path_factory: pytest.TempPathFactory, greenr_dir: Path
) -> Iterator[AppApi]:
    """The API, started before its model has the ``champion`` alias (what the client sees
    then is kept in ``before_ready``), then ready once the alias is set."""
    from dashboards.client import ApiClient, ApiUnavailableError

    with api_process(app_model, tmp_path_factory.mktemp("app-api")) as api:
        image = (greenr_dir / "grass" / "00000000.jpg").read_bytes()
        with ApiClient(api.url) as client:
            api.before_ready["health"] = client.health()
            try:
                client.predict("g.jpg", image)
            except ApiUnavailableError as exc:
                api.before_ready["predict_error"] = exc
        app_model.registry.set_alias(app_model.version)
        wait_ready(api.url)
        yield api


# --- a model that can explain its answers ----------------------------------------------------
EXPLAIN_MODEL = "dandelion-app-explain"  # its own registered model, served by ONNX


@pytest.fixture(scope="session")
def explaining_api(
    mlflow_server: str, s3_server: str, greenr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``python -m api`` serving ``EXPLAIN_MODEL@champion``, a version registered with its
    runtime (INT8 ONNX, feature maps included: the tiny colour model on 16 px blocks), so it
    can show where it looked (``explain=true``)."""
    from tests.api.conftest import (
        Registry,
        api_env,
        dataset_images,
        fit_openset,
        start_api,
        stop_api,
        train_parts,
    )

    registry = Registry(mlflow_server, s3_server, train_parts(greenr_dir), name=EXPLAIN_MODEL)
    openset = fit_openset(greenr_dir, registry.parts)
    photos = [p for p, _ in dataset_images(greenr_dir, parity=0)[1::8]]
    registry.set_alias(registry.register_with_runtime(openset.detector, photos))
    workdir = tmp_path_factory.mktemp("app-explain-api")
    port = free_port()
    env = api_env(workdir, port, registry.tracking_uri, DANDELION_MODEL_NAME=EXPLAIN_MODEL)
    proc = start_api(env, workdir / "api.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health/live", timeout=120, proc=proc)
        wait_ready(url)
        yield url
    finally:
        stop_api(proc)


class TcpRelay:
    """A loopback TCP relay to ``target``; ``stop()`` closes it and every open connection,
    ``start()`` opens it again on the same port: the API going away and coming back."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))  # sets SO_REUSEADDR
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._server.close()
            self._server = None
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
