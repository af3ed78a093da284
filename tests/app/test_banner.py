"""When the API is down, the app shows a banner (never a traceback): real Voila, real Chromium.

Nothing listens on the API's port, exactly as when the API process is down.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.app.conftest import ARTIFACTS, dead_url, open_app


@pytest.mark.slow  # a browser (Chromium) on a real Voila page
def test_banner_instead_of_traceback_when_api_is_down(voila: Callable[..., Any], page: Any) -> None:
    api = dead_url()
    with voila(api) as url:
        open_app(page, url)
        banner = page.locator(".dl-banner")
        banner.wait_for(timeout=30_000)
        assert banner.inner_text().startswith("API unavailable")
        assert api in banner.inner_text()
        assert page.locator(".dl-upload").is_disabled()
        assert page.locator(".dl-model-line").inner_text() == "unknown"
        text = page.locator("body").inner_text()
        for marker in ("Traceback", "Error", "Exception"):
            assert marker not in text
        assert page.page_errors == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "banner-api-down.png"), full_page=True)
