"""The app's "Show where the model looked" toggle, driven in-process (no browser) against the
real API: a version registered with its ONNX runtime (feature maps included: the tiny colour
model on 16 px blocks) gives cards whose photo switches to the photo with the map; the shared
app model (served by Keras) cannot explain, and its cards say so and still answer."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ipywidgets as w
import numpy as np
import pytest
from PIL import Image

from dashboards.client import ApiClient
from dashboards.ui import DandelionApp
from tests.app.conftest import ARTIFACTS, AppApi, open_app, upload_entry, wait_ready
from tests.conftest import ROOT, free_port, wait_http

EXPLAIN_MODEL = "dandelion-app-explain"


@pytest.fixture(scope="module")
def explaining_api(
    mlflow_server: str, s3_server: str, greenr_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``python -m api`` serving a version registered with its runtime (INT8 ONNX)."""
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


def _find(widget: Any, kind: type, css: str) -> list[Any]:
    found = [widget] if isinstance(widget, kind) and css in widget._dom_classes else []
    for child in getattr(widget, "children", ()):
        found += _find(child, kind, css)
    return found


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=float)


def test_the_toggle_shows_where_the_model_looked(explaining_api: str, greenr_dir: Path) -> None:
    path = greenr_dir / "dandelion" / "00000002.jpg"
    data = path.read_bytes()
    app = DandelionApp(ApiClient(explaining_api))
    app.check()
    before = upload_entry("before.jpg", data)
    app.upload.value = (before,)  # toggle off: no map asked for
    assert not _find(app.results.children[0], w.Image, "dl-preview-explained")
    app.explain.value = True
    app.upload.value = (upload_entry("dandelion.jpg", data),)
    card = app.results.children[0]
    (image,) = _find(card, w.Image, "dl-preview-explained")
    (caption,) = _find(card, w.HTML, "dl-looked-box")
    result = next(iter(app.history))
    assert result.explanation is not None and result.explanation["shape"] == [22, 22]
    assert f"where the model found {result.explanation['class']}" in caption.value
    looked = image.value
    # the overlay keeps the photo's own aspect ratio and tints it
    with Image.open(path) as photo:
        ratio = photo.width / photo.height
    with Image.open(io.BytesIO(looked)) as shown:
        assert shown.width / shown.height == pytest.approx(ratio, abs=0.02)
    app.explain.value = False  # back to the photo
    plain = image.value
    assert plain != looked and caption.layout.display == "none"
    assert np.abs(_pixels(plain) - _pixels(looked)).mean() > 5
    app.explain.value = True
    assert image.value == looked and caption.layout.display is None


def test_a_model_that_cannot_explain_still_answers(app_api: AppApi, greenr_dir: Path) -> None:
    app = DandelionApp(ApiClient(app_api.url))
    app.check()
    app.explain.value = True
    app.upload.value = (
        upload_entry("grass.jpg", (greenr_dir / "grass" / "00000002.jpg").read_bytes()),
    )
    card = app.results.children[0]
    result = next(iter(app.history))
    assert result.ok and result.explanation is None
    assert result.explain_note == "explanations need the model version's ONNX runtime"
    (note,) = _find(card, w.HTML, "dl-explain-note")
    assert "This model cannot show where it looked" in note.value
    assert not _find(card, w.Image, "dl-preview-explained")


@pytest.mark.slow  # drives Chromium on the real Voila app
def test_the_toggle_in_chromium(
    explaining_api: str, voila: Callable[..., Any], page: Any, greenr_dir: Path, tmp_path: Path
) -> None:
    """Screenshot ``test-artifacts/app/app-explain.png``; with ``DANDELION_TEST_UPDATE_DOCS=1``
    it also replaces the user guide's ``docs/img/app-explain.png``."""
    photos = [greenr_dir / "dandelion" / "00000002.jpg", greenr_dir / "grass" / "00000002.jpg"]
    uploads = []
    for path in photos:
        uploads.append(tmp_path / f"{path.parent.name}-{path.name}")
        shutil.copyfile(path, uploads[-1])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with voila(explaining_api) as url:
        open_app(page, url)
        upload = page.locator(".dl-upload")
        page.wait_for_function("!document.querySelector('.dl-upload').disabled", timeout=120_000)
        toggle = page.locator(".dl-explain-toggle input")
        assert "Show where the model looked" in page.locator(".dl-explain-toggle").inner_text()
        toggle.check()
        with page.expect_file_chooser() as chooser:
            upload.click()
        chooser.value.set_files([str(p) for p in uploads])
        page.wait_for_function(
            "document.querySelectorAll('.dl-card .dl-looked').length === 2", timeout=60_000
        )
        looked = page.locator(".dl-looked")
        assert all(looked.nth(i).is_visible() for i in range(2))
        assert "Red: where the model found" in looked.nth(0).inner_text()
        images = page.locator(".dl-preview-explained")
        shown = images.nth(0).get_attribute("src")
        ratio = images.nth(0).evaluate("e => e.naturalWidth / e.naturalHeight")
        with Image.open(uploads[-1]) as photo:  # newest first: the grass photo
            assert ratio == pytest.approx(photo.width / photo.height, abs=0.02)
        shot = ARTIFACTS / "app-explain.png"
        page.screenshot(path=str(shot), full_page=True)
        toggle.uncheck()  # back to the photos
        page.wait_for_function(
            "[...document.querySelectorAll('.dl-looked')].every(e => e.offsetParent === null)",
            timeout=30_000,
        )
        assert images.nth(0).get_attribute("src") != shown
    if os.environ.get("DANDELION_TEST_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "img" / "app-explain.png")
    assert page.page_errors == []
