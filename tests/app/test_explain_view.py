"""Where the model looked, on the app and on the reviewer page, driven in-process (no browser)
against the real API: a version registered with its ONNX runtime (feature maps included: the
tiny colour model on 16 px blocks; ``explaining_api`` in conftest.py) gives cards whose photo
switches to the photo with the map in the app, and a map beside each photo on the reviewer
page; the shared app model (served by Keras) cannot explain, and both pages say so and work
on."""

from __future__ import annotations

import html
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ipywidgets as w
import numpy as np
import pytest
from PIL import Image

from dandelion_lib.core.config import Settings
from dashboards.client import ApiClient
from dashboards.review import ReviewPage
from dashboards.ui import DandelionApp
from tests.app.conftest import ARTIFACTS, Answered, AppApi, add_feedback, open_app, upload_entry
from tests.conftest import ROOT


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


def _served(api_url: str) -> tuple[float, float]:
    """Users' predictions the API has counted so far (``dandelion_predictions_total``) and
    its answers to reviews (``dandelion_review_predictions_total``)."""
    text = httpx.get(f"{api_url}/metrics", timeout=30).text
    users = sum(
        float(v) for v in re.findall(r"^dandelion_predictions_total\{[^}]*\} (\S+)$", text, re.M)
    )
    reviews = re.findall(r"^dandelion_review_predictions_total (\S+)$", text, re.M)
    return users, float(reviews[0])


def give_feedback(workdir: Path, photos: list[tuple[Path, str]]) -> list[str]:
    """Feedback with each photo, answered by the given model version: the user disagrees each
    time, and the confidence rises photo by photo, so the queue keeps this order."""
    items = []
    for n, (path, version) in enumerate(photos):
        correct = path.parent.name
        answer = "grass" if correct == "dandelion" else "dandelion"
        items.append(Answered(path.read_bytes(), answer, correct, version, 0.7 + n / 100))
    return add_feedback(workdir, items, "explained")


def test_the_reviewer_page_shows_where_the_served_model_looked(
    explaining_api: str, greenr_dir: Path, tmp_path: Path
) -> None:
    with ApiClient(explaining_api) as client:
        served = client.model().version
    photos = [greenr_dir / "dandelion" / "00000003.jpg", greenr_dir / "grass" / "00000004.jpg"]
    same, older = give_feedback(tmp_path, [(photos[0], served), (photos[1], f"{served}0")])
    settings = Settings(workdir=tmp_path, api_url=explaining_api)
    page = ReviewPage.from_settings(settings, refresh_interval_s=0)
    try:
        users, reviews = _served(explaining_api)
        assert page.refresh() and list(page.cards) == [same, older]
        # one review per card, none counted as a user's prediction
        assert _served(explaining_api) == (users, reviews + 2)
        for fid, path in zip((same, older), photos, strict=True):
            card = page.cards[fid]
            assert card.looked is not None
            image, caption = card.looked.children
            assert isinstance(image, w.Image) and "dl-looked-map" in image._dom_classes
            # beside the photo, at the photo's own aspect ratio, tinted by the map
            assert card.widget.children.index(card.looked) == 2
            with Image.open(path) as photo, Image.open(io.BytesIO(image.value)) as shown:
                assert shown.width / shown.height == pytest.approx(
                    photo.width / photo.height, abs=0.02
                )
            assert np.abs(_pixels(image.value) - _pixels(card.preview.value)).mean() > 5
            assert "Red: where the model found" in caption.value
            assert f"Map by version {served}, the model the API serves now" in caption.value
        older_caption = page.cards[older].looked.children[1].value  # type: ignore[union-attr]
        same_caption = page.cards[same].looked.children[1].value  # type: ignore[union-attr]
        assert f"version {served}0 answered this feedback" in older_caption
        assert "answered this feedback" not in same_caption
        shown = page.cards[older].looked.children[0].value  # type: ignore[union-attr]
        page.cards[same].accept.click()  # the page reloads: the other card's map is kept
        assert list(page.cards) == [older]
        assert page.cards[older].looked.children[0].value == shown  # type: ignore[union-attr]
        assert _served(explaining_api) == (users, reviews + 2)  # not asked again
    finally:
        page.stop()


def test_the_reviewer_page_says_when_the_served_model_cannot_explain(
    app_api: AppApi, greenr_dir: Path, tmp_path: Path
) -> None:
    photos = [greenr_dir / "dandelion" / "00000005.jpg", greenr_dir / "grass" / "00000006.jpg"]
    give_feedback(tmp_path, [(p, app_api.version) for p in photos])
    page = ReviewPage.from_settings(
        Settings(workdir=tmp_path, api_url=app_api.url), refresh_interval_s=0
    )
    try:
        users, reviews = _served(app_api.url)
        assert page.refresh() and len(page.cards) == 2
        for card in page.cards.values():
            assert card.looked is not None and isinstance(card.preview, w.Image)
            (line,) = card.looked.children
            assert (
                f"No map: the API's model (version {app_api.version}) cannot show where it "
                "looked (explanations need the model version's ONNX runtime)"
            ) in html.unescape(line.value)
        # the first card found out; the second was not sent (one answer without the map)
        assert _served(app_api.url) == (users, reviews + 1)
    finally:
        page.stop()


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
