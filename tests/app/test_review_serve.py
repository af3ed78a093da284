"""How the reviewer page is served (``python -m dashboards.serve --review``) and how
``nox -s lab`` starts JupyterLab: a token is required, the page has its own port and serves
only ``review.ipynb``; the slow tests run the real Voila server (which runs the notebook in the
``dandelion`` kernel), click *Accept* in Chromium and show the maps of where the model looked."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dandelion_lib.core.config import Settings
from dandelion_lib.data.feedback import FeedbackStore
from dashboards import lab, serve
from tests.app.conftest import ARTIFACTS, Answered, add_feedback, dead_url, serve_process
from tests.conftest import ROOT, free_port

TOKEN = "s3cret-review-token-0123456789"


def test_the_review_page_refuses_to_start_without_a_real_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for token in (None, "   ", "short-token"):
        settings = Settings(review_token=token)
        with pytest.raises(serve.ServeConfigError):
            serve.review_page(settings)
        monkeypatch.setattr(serve, "get_settings", lambda s=settings: s)
        assert serve.main(["--review"]) == 2  # before any server starts
        err = capsys.readouterr().err
        assert "reviewer page not started" in err and "DANDELION_REVIEW_TOKEN" in err
        assert "Traceback" not in err


def test_the_review_page_has_its_own_notebook_port_and_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = serve.review_page(Settings(review_token=TOKEN))
    assert (page.notebook, page.host, page.port, page.token) == (
        ROOT / "dashboards" / "review.ipynb",
        "127.0.0.1",
        8867,
        TOKEN,
    )
    argv = serve.voila_argv(Settings(review_token=TOKEN), page)
    assert argv[0] == str(serve.REVIEW_NOTEBOOK)
    assert not any(a.endswith("app.ipynb") for a in argv)
    assert "--port=8867" in argv and "--Voila.ip=127.0.0.1" in argv
    assert not any(TOKEN in a for a in argv)  # never on a command line
    assert "--show_tracebacks=False" in argv and "--strip_sources=True" in argv

    app = serve.voila_argv(Settings())  # the app is unchanged: its notebook, its port
    assert app[0] == str(serve.NOTEBOOK) and "--port=8866" in app

    monkeypatch.setenv("DANDELION_REVIEW_PORT", "9123")
    monkeypatch.setenv("DANDELION_REVIEW_HOST", "0.0.0.0")
    monkeypatch.setenv("DANDELION_REVIEW_TOKEN", TOKEN)
    from_env = serve.review_page(Settings())
    assert (from_env.host, from_env.port, from_env.token) == ("0.0.0.0", 9123, TOKEN)
    assert TOKEN not in repr(Settings())  # a SecretStr


def test_the_review_notebook_is_stored_clean() -> None:
    nb = json.loads(serve.REVIEW_NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "dandelion"
    assert nb["metadata"]["title"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "ReviewPage.from_settings" in "".join(code[-1]["source"])


def test_lab_opens_the_notebooks_with_the_dandelion_kernel_on_the_embedded_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = lab.lab_argv(["--port=8890"])
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={ROOT / 'notebooks'}" in argv
    assert "--ServerApp.ip=127.0.0.1" in argv
    assert "--MappingKernelManager.default_kernel_name=dandelion" in argv
    assert argv[-1] == "--port=8890"
    assert importlib.util.find_spec("jupyterlab") is not None  # installed by the lock

    monkeypatch.chdir(tmp_path)
    env = lab.lab_environment(Settings(workdir=Path(".dandelion")))
    assert env["DANDELION_WORKDIR"] == str(tmp_path / ".dandelion")  # absolute
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert env.get("PATH") == os.environ.get("PATH")  # the rest passes through


@contextmanager
def review_server(tmp_path: Path, **env: str) -> Iterator[str]:
    port = free_port()
    full = {
        **os.environ,
        "DANDELION_WORKDIR": str(tmp_path),
        "DANDELION_REVIEW_PORT": str(port),
        **env,
    }
    with serve_process(["--review"], full, tmp_path / "voila.log", port, timeout=90) as url:
        yield url


def seed(workdir: Path, greenr: Path) -> list[str]:
    """Two pending feedback items with photos in ``workdir``'s embedded feedback database:
    a disagreement (first in the queue) and an agreement."""
    pairs = (("grass", "grass"), ("grass", "dandelion"))
    items = [
        Answered((greenr / correct / f"{20 + n:08d}.jpg").read_bytes(), answer, correct, "5")
        for n, (answer, correct) in enumerate(pairs)
    ]
    return add_feedback(workdir, items, "served")


@pytest.mark.slow
def test_the_served_review_page_needs_the_token_serves_only_itself_and_records_clicks(
    tmp_path: Path, greenr_dir: Path, page: Any
) -> None:
    """One server: plain HTTP for the token and what is served, then Chromium for a click."""
    agreement, disagreement = seed(tmp_path, greenr_dir)
    with (
        review_server(tmp_path, DANDELION_REVIEW_TOKEN=TOKEN, DANDELION_API_URL=dead_url()) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        denied = client.get("/")
        assert denied.status_code == 302 and "/login" in denied.headers["location"]
        assert client.get("/?token=not-the-token-at-all").status_code == 302
        for path in ("/voila/files/app.ipynb", "/voila/files/review.py", "/app.ipynb"):
            assert client.get(path).status_code in (302, 403, 404), path
        assert client.get("/health/live").status_code == 200  # probes need no token

        page.goto(f"{url}/?token={TOKEN}", wait_until="domcontentloaded", timeout=90_000)
        page.wait_for_selector(".dl-review .dl-item", timeout=90_000)
        assert page.title() == "Review feedback · dandelion"
        content = page.content()
        assert "ReviewPage.from_settings" not in content and "Traceback" not in content
        items = page.locator(".dl-item")
        assert items.count() == 2
        first = items.nth(0)
        assert "disagrees" in first.inner_text() and first.locator("img").count() == 1
        assert page.locator(".dl-count-waiting").inner_text() == "0"
        first.locator(".dl-accept").click()  # over the kernel's websocket, signed in by cookie
        page.wait_for_function(
            "document.querySelector('.dl-count-waiting')?.innerText === '1'", timeout=60_000
        )
        assert page.locator(".dl-item").count() == 1
        assert page.page_errors == []

    store = FeedbackStore.from_settings(Settings(workdir=tmp_path))
    try:
        assert [r.feedback_id for r in store.accepted()] == [disagreement]
        pending = store.get_feedback(agreement)
        assert pending is not None and pending.reviewed_at is None
    finally:
        store.close()


@pytest.mark.slow
def test_the_served_review_page_shows_where_the_model_looked_in_chromium(
    tmp_path: Path, greenr_dir: Path, page: Any, explaining_api: str
) -> None:
    """Screenshot ``test-artifacts/app/review-explain.png``; with
    ``DANDELION_TEST_UPDATE_DOCS=1`` it also replaces the user guide's
    ``docs/img/review-explain.png``."""
    seed(tmp_path, greenr_dir)
    photo = greenr_dir / "dandelion" / "00000021.jpg"  # the disagreement: first in the queue
    env = {"DANDELION_REVIEW_TOKEN": TOKEN, "DANDELION_API_URL": explaining_api}
    with review_server(tmp_path, **env) as url:
        page.goto(f"{url}/?token={TOKEN}", wait_until="domcontentloaded", timeout=90_000)
        page.wait_for_function(
            "document.querySelectorAll('.dl-item img.dl-looked-map').length === 2",
            timeout=120_000,
        )
        first = page.locator(".dl-item").nth(0)
        assert first.locator("img").count() == 2  # the photo, and the photo with the map
        caption = first.locator(".dl-looked").inner_text()
        assert "Red: where the model found" in caption and "the model the API serves now" in caption
        ratio = first.locator("img.dl-looked-map").evaluate("e => e.naturalWidth / e.naturalHeight")
        with Image.open(photo) as image:
            assert ratio == pytest.approx(image.width / image.height, abs=0.02)
        # the notebook's notes (cells tagged dev-only) are hidden, as in the app
        assert page.locator(".celltag_dev-only").count() >= 1
        assert not page.get_by_text("All logic lives in").is_visible()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "review-explain.png"
        page.screenshot(path=str(shot), full_page=True)
        assert "Traceback" not in page.content() and page.page_errors == []
    if os.environ.get("DANDELION_TEST_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "img" / "review-explain.png")
