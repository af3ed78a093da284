"""Crowds cannot lock users out of the app (``dashboards/visits.py``), on a real Voila server.

Plain page loads (no JavaScript: ``curl``, crawlers) start no kernel; a script that passes the
visit gate holds at most its per-visitor share, and its kernels go once their connect
deadline passes; a page that connected its websocket keeps its kernel, and a tab that has gone
makes room for the same visitor's next one. Then a real browser (Chromium) classifies a photo
on the real API right after a crowd of plain requests.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket

from tests.app.conftest import AppApi, dead_url, open_app, visit_cookies
from tests.app.test_serve import load_pages

KERNEL_ID = re.compile(r'"kernelId":\s*"([0-9a-f-]{36})"')
CROWD = 50
BROWSER_CONNECT_DEADLINE_S = 20
"""The connect deadline of the browser's test (the product's default is 60 s). With 3 s, the
page never showed the app within 90 s in two CI runs on a machine loaded by the other suites
(it passes alone and under lighter loads): a page that connects its websocket later than the
deadline loses its kernel, and 3 s is tight for Chromium under that load."""


def sessions(url: str) -> int:
    return int(httpx.get(f"{url}/health/ready", timeout=10).json()["sessions"])


def wait_sessions(url: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (found := sessions(url)) != expected:
        assert time.monotonic() < deadline, f"{found} sessions after {timeout} s, not {expected}"
        time.sleep(0.5)


def assert_crowd_started_nothing(url: str) -> None:
    """``CROWD`` concurrent plain page loads: each gets the gate page, none a kernel."""
    answers = load_pages(url, [{} for _ in range(CROWD)])
    assert [r.status_code for r in answers] == [200] * CROWD
    assert all("This app needs JavaScript" in r.text for r in answers)
    assert sessions(url) == 0


@pytest.mark.faults
def test_plain_loads_start_no_kernel_and_a_scripted_visitor_is_capped_and_culled(
    voila: Callable[..., Any],
) -> None:
    with voila(
        dead_url(), app_max_kernels=10, app_max_kernels_per_visitor=1, app_connect_timeout_s=3
    ) as url:
        assert_crowd_started_nothing(url)

        visit = visit_cookies(url)
        page = httpx.get(url, cookies=visit, timeout=90)
        assert page.status_code == 200
        match = KERNEL_ID.search(page.text)
        assert match, "no kernel id in the page"
        channels = f"ws{url.removeprefix('http')}/api/kernels/{match.group(1)}/channels"
        tab = websocket.create_connection(channels, timeout=30)  # the page connects
        try:
            time.sleep(6)  # twice the connect deadline: a connected page keeps its kernel
            assert sessions(url) == 1
            queued = httpx.get(url, cookies=visit, timeout=90)  # the visitor's second tab
            assert queued.status_code == 503
            assert queued.headers["retry-after"] == "5"
            assert '<meta http-equiv="refresh" content="5">' in queued.text
            assert "close a tab" in queued.text.lower()
            assert httpx.get(url, cookies=visit_cookies(url), timeout=90).status_code == 200
            assert sessions(url) == 2  # another visitor is not held up
        finally:
            tab.close()  # the tab goes: its kernel makes room for the visitor's next page
        again = httpx.get(url, cookies=visit, timeout=90)
        assert again.status_code == 200
        assert KERNEL_ID.search(again.text).group(1) != match.group(1)  # type: ignore[union-attr]
        assert sessions(url) <= 2
        wait_sessions(url, 0, timeout=30)  # pages that never connect lose their kernels


@pytest.mark.slow  # a browser (Chromium) on the real app, the real API and a registered model
def test_a_browser_classifies_a_photo_right_after_a_crowd_of_plain_page_loads(
    app_api: AppApi,
    voila: Callable[..., Any],
    page: Any,
    greenr_dir: Path,
    tmp_path: Path,
) -> None:
    photo = tmp_path / "dandelion.jpg"
    shutil.copyfile(greenr_dir / "dandelion" / "00000000.jpg", photo)
    with voila(app_api.url, app_connect_timeout_s=BROWSER_CONNECT_DEADLINE_S) as url:
        assert_crowd_started_nothing(url)

        started = time.monotonic()
        open_app(page, url)  # through the gate page: its script sets the cookie, reloads
        upload = page.locator(".dl-upload")
        page.wait_for_function(
            "!document.querySelector('.dl-upload')?.disabled", timeout=60_000
        )  # the API is ready
        with page.expect_file_chooser() as chooser:
            upload.click()
        chooser.value.set_files([str(photo)])
        card = page.locator(".dl-card")
        card.wait_for(timeout=60_000)
        seconds = time.monotonic() - started
        print(f"\nafter {CROWD} plain page loads: a photo classified {seconds:.1f} s after opening")
        assert seconds < 60, f"{seconds:.1f} s (target 10 s)"  # generous: a loaded CI machine
        assert card.get_attribute("class") is not None
        assert "dl-result-error" not in str(card.get_attribute("class"))
        assert photo.name in card.inner_text()

        time.sleep(BROWSER_CONNECT_DEADLINE_S + 1)  # past the deadline: the browser's stays
        assert sessions(url) == 1
        assert page.locator(".dl-upload").is_enabled()
        assert page.page_errors == []
