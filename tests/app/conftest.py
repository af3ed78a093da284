"""Fixtures of the web app tests: a real Voila server and Debian's Chromium (via Playwright)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, wait_http

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "app"


def dead_url() -> str:
    """An http URL on loopback where nothing listens (an API that is down)."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def voila_server(api_url: str, log_dir: Path, **settings: Any) -> Iterator[str]:
    """``python -m dashboards.serve`` (the production launcher) on a free port; yields its URL.

    ``settings`` become ``DANDELION_<NAME>`` variables (e.g. ``app_max_kernels=1``).
    """
    port = free_port()
    env = {
        **os.environ,
        "DANDELION_API_URL": api_url,
        "DANDELION_APP_HOST": "127.0.0.1",
        "DANDELION_APP_PORT": str(port),
        "DANDELION_APP_HEALTH_INTERVAL_S": "1",
    }
    env.update({f"DANDELION_{k.upper()}": str(v) for k, v in settings.items()})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"voila-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dashboards.serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            # A static file: answering it starts no kernel.
            wait_http(f"{url}/voila/static/voila.js", timeout=60, proc=proc)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)  # Voila shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def voila(tmp_path: Path) -> Callable[..., Any]:
    """Factory: ``with voila(api_url, **settings) as url: ...``."""

    def start(api_url: str, **settings: Any) -> Any:
        return voila_server(api_url, tmp_path, **settings)

    return start


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (headless)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: run `bash scripts/install-system-deps.sh`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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
