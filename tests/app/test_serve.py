"""The production Voila configuration of ``python -m dashboards.serve``, on a real Voila server.

Plain HTTP is enough here (with the visit cookie a browser's script takes from the gate page):
rendering the page runs the notebook in a fresh kernel; the browser
tests cover what the page then does. The API is down in these tests (nothing listens on its
port), which the app must survive.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import yaml

from dashboards.serve import NOTEBOOK
from tests.app.conftest import dead_url, visit_cookies
from tests.conftest import ROOT


def test_page_is_titled_and_shows_no_source(voila: Callable[..., Any]) -> None:
    title = json.loads(NOTEBOOK.read_text())["metadata"]["title"]
    # A read-only home (hardened container): Jupyter's data dir is not writable.
    with voila(dead_url(), env={"JUPYTER_DATA_DIR": "/proc/not-writable"}) as url:
        page = httpx.get(url, timeout=90, cookies=visit_cookies(url))
        assert page.status_code == 200
        assert f"<title>{title}</title>" in page.text
        for source in ("DandelionApp.from_settings", "api_url = None", "import "):
            assert source not in page.text
        assert "Traceback" not in page.text
        # Only the notebook is served: neither the app's modules nor other files.
        for path in ("/voila/files/client.py", "/voila/files/app.ipynb", "/voila/files/ui.py"):
            assert httpx.get(url + path, timeout=10).status_code in (403, 404), path


@pytest.mark.slow  # waits for Voila's idle cull (10 s, checked every few seconds): about 25 s
def test_sessions_are_capped_idle_ones_culled_and_probes_start_none(
    voila: Callable[..., Any],
) -> None:
    with voila(dead_url(), app_max_kernels=1, app_cull_idle_s=10) as url:
        for _ in range(5):  # probes start no kernel, so they never fill the cap
            assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200
            ready = httpx.get(f"{url}/health/ready", timeout=10)
            assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "sessions": 0, "max_sessions": 1}

        visit = visit_cookies(url)
        for _ in range(3):  # plain page loads (no visit cookie) start no kernel
            assert "JavaScript" in httpx.get(url, timeout=10).text
        assert httpx.get(f"{url}/health/ready", timeout=10).json()["sessions"] == 0
        page = httpx.get(url, timeout=90, cookies=visit)
        assert page.status_code == 200  # its kernel stays until culled
        refused = httpx.get(url, timeout=90, cookies=visit_cookies(url))  # another visitor
        assert refused.status_code == 503
        assert "capacity" in refused.text
        full = httpx.get(f"{url}/health/ready", timeout=10)
        assert full.status_code == 503 and full.json()["status"] == "at_capacity"
        assert httpx.get(f"{url}/health/live", timeout=10).status_code == 200

        deadline = time.monotonic() + 90
        while True:  # the idle kernel is culled, which frees the slot
            time.sleep(1)
            status = httpx.get(url, timeout=90, cookies=visit).status_code
            if status == 200:
                break
            assert status == 503
            assert time.monotonic() < deadline, "idle kernel was not culled within 40 s"


def test_deployments_probe_the_kernel_free_endpoints_and_bind_all_interfaces() -> None:
    """The container set-ups run this launcher: their probes must not start kernels (probing
    ``/`` would fill the session cap), and in a container the app must bind 0.0.0.0."""
    deployment = yaml.safe_load((ROOT / "k8s/base/app/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    paths = {p: container[p]["httpGet"]["path"] for p in container if p.endswith("Probe")}
    assert paths == {
        "startupProbe": "/health/live",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    dockerfile = (ROOT / "docker/app.Dockerfile").read_text()
    assert "DANDELION_APP_HOST=0.0.0.0" in dockerfile
    assert '"http://127.0.0.1:8866/health/live"' in dockerfile
    assert 'CMD ["python", "-m", "dashboards.serve"]' in dockerfile
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["app"]["healthcheck"]["test"][-1].endswith("/health/live")


async def _gather_pages(url: str, cookies: list[dict[str, str]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=180) as client:
        return list(await asyncio.gather(*(client.get(url, cookies=c) for c in cookies)))


def load_pages(url: str, cookies: list[dict[str, str]]) -> list[httpx.Response]:
    """Concurrent page loads, one per cookie set, on an event loop of their own thread (a
    test that ran before may leave a loop running in this one, e.g. Playwright's sync API)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _gather_pages(url, cookies)).result()


@pytest.mark.faults
def test_the_session_cap_holds_under_concurrent_page_loads(voila: Callable[..., Any]) -> None:
    """Five visitors' page loads at once with a cap of two: two pages, three queue pages that
    retry by themselves, never more than two kernels (each kernel takes seconds to start, the
    window of the race)."""
    with voila(dead_url(), app_max_kernels=2, app_cull_idle_s=10) as url:
        answers = load_pages(url, [visit_cookies(url) for _ in range(5)])
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 200, 503, 503, 503], statuses
        for refused in (r for r in answers if r.status_code == 503):
            assert "capacity" in refused.text and "Traceback" not in refused.text
            assert refused.headers["content-type"].startswith("text/html")
            assert refused.headers["retry-after"] == "5"
            assert '<meta http-equiv="refresh" content="5">' in refused.text
        ready = httpx.get(f"{url}/health/ready", timeout=10).json()
        assert ready == {"status": "at_capacity", "sessions": 2, "max_sessions": 2}


BAD_PATHS = [
    "/logout",
    "/voila/templates/lab/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/voila/templates/lab/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/voila/templates/lab/static/%2e%2e/%2e%2e/x",
    "/voila/templates/lab/x",
    "/voila/templates/%2e%2e/static/x",
    "/voila/static/..%2F..%2F..%2Fetc%2Fpasswd",
    "/voila/files/..%2F..%2F..%2Fetc%2Fpasswd",
]


@pytest.mark.faults
def test_logout_and_bad_paths_answer_4xx(voila: Callable[..., Any]) -> None:
    with voila(dead_url()) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/voila/templates/lab/static/voila.js").status_code == 200
        for path in BAD_PATHS:
            r = client.get(path)
            assert 400 <= r.status_code < 500, (path, r.status_code)
            assert "Traceback" not in r.text and "root:" not in r.text
