"""End to end in a real browser: Debian's Chromium (Playwright) on the real Voila app, the real
API (``python -m api``) and a real model registered in the real MLflow server.

The app is opened before the API runs (banner), then the API starts and the page recovers by
itself; real photos of both classes, a photo of neither class (an ood-dev object the model's
open-set detector rejects) and a text file are uploaded, feedback (including "Neither") is
clicked and read back from the API's feedback database. Screenshots go to ``test-artifacts/app/``; with
``DANDELION_TEST_UPDATE_DOCS=1`` they also replace the user guide's ``docs/img/app*.png``.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.face_settings import ServingSettings
from dandelion_lib.core.labels import DEFAULT_LABELS as LABELS
from tests.app.conftest import (
    APP_MODEL,
    ARTIFACTS,
    AppModel,
    api_process,
    open_app,
)
from tests.conftest import ROOT, free_port

THRESHOLD = ServingSettings.model_fields["confidence_threshold"].default


def _confident_examples(model: AppModel, greenr: Path) -> dict[str, Path]:
    """The first reference photo of each class that the model answers right with confidence
    (and does not answer ``unknown``)."""
    predictor = model.registry.predictor(model.version)
    picks: dict[str, Path] = {}
    for label in LABELS:
        for path in sorted((greenr / label).glob("*.jpg")):
            p = predictor.predict_bytes([path.read_bytes()])[0]
            if predictor.decide(p).label == label and p.confidence >= THRESHOLD + 0.05:
                picks[label] = path
                break
    assert set(picks) == set(LABELS)
    return picks


@pytest.mark.slow
def test_end_to_end_in_chromium(
    app_model: AppModel,
    voila: Callable[..., Any],
    page: Any,
    greenr_dir: Path,
    tmp_path: Path,
) -> None:
    picks = _confident_examples(app_model, greenr_dir)
    uploads = [tmp_path / f"{label}-{path.name}" for label, path in picks.items()]
    for target, (_, source) in zip(uploads, picks.items(), strict=True):
        shutil.copyfile(source, target)
    outside = tmp_path / f"object-{app_model.openset.unknown_photo.name}"
    shutil.copyfile(app_model.openset.unknown_photo, outside)
    text = tmp_path / "notes.txt"
    text.write_text("a shopping list, not a photo\n")
    app_model.registry.set_alias(app_model.version)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    api_port = free_port()
    with voila(f"http://127.0.0.1:{api_port}") as url:
        open_app(page, url)
        banner = page.locator(".dl-banner")
        banner.wait_for(timeout=30_000)
        assert "API unavailable" in banner.inner_text()
        assert page.locator(".dl-upload").is_disabled()
        page.screenshot(path=str(ARTIFACTS / "e2e-1-api-down.png"), full_page=True)

        (tmp_path / "api").mkdir()
        with api_process(app_model, tmp_path / "api", port=api_port) as api:
            banner.wait_for(state="detached", timeout=180_000)  # recovers by itself
            header = page.locator(".dl-model-line").inner_text()
            assert header == f"{APP_MODEL} v{app_model.version} (champion) · test accuracy 70.0 %"

            upload = page.locator(".dl-upload")
            assert upload.is_enabled()
            with page.expect_file_chooser() as chooser:
                upload.click()
            chooser.value.set_files([str(p) for p in [*uploads, outside, text]])
            page.wait_for_function(
                "document.querySelectorAll('.dl-card').length === 4", timeout=60_000
            )

            cards = page.locator(".dl-card")
            texts = [cards.nth(i).inner_text() for i in range(4)]  # newest first
            assert texts[0].startswith("no preview") and "notes.txt" in texts[0]
            assert "Not classified:" in texts[0]
            error = page.locator(".dl-result-error .dl-error").inner_text()
            assert len(error) > len("Not classified: ")
            # The photo of neither class: shown, with its own badge and message, no class bar.
            unknown = page.locator(".dl-result-unknown")
            assert unknown.count() == 1 and outside.name in texts[1]
            assert unknown.locator(".dl-label-unknown").inner_text() == "unknown"
            message = unknown.locator(".dl-unknown").inner_text()
            assert message == "This doesn't look like a dandelion or a grass photo"
            assert unknown.locator("img").count() == 1 and unknown.locator(".dl-bar").count() == 0
            badge = unknown.locator(".dl-label-unknown").evaluate(
                "e => getComputedStyle(e).backgroundColor"
            )
            assert badge == "rgb(123, 63, 160)"  # its own colour, not the uncertain grey
            for card_text, (label, path) in zip(
                texts[:1:-1], zip(picks, uploads, strict=True), strict=True
            ):
                assert path.name in card_text and label in card_text
            for label in LABELS:
                card = page.locator(f".dl-result-{label}")
                assert card.count() == 1, f"expected one {label} card"
                assert card.locator(f".dl-label-{label}").inner_text() == label
                assert card.locator("img").count() == 1  # thumbnail
                assert "confidence" in card.inner_text()
                assert card.locator(".dl-bar").count() == 1

            # Feedback: "Correct" on the dandelion, "Wrong: it is dandelion" on the grass.
            page.locator(".dl-result-dandelion .dl-feedback-dandelion").click()
            page.locator(".dl-result-grass .dl-feedback-dandelion").click()
            for label in LABELS:
                note = page.locator(f".dl-result-{label} .dl-feedback-ok")
                note.wait_for(timeout=30_000)
                assert "Feedback recorded: it is dandelion" in note.inner_text()
            neither = unknown.locator(".dl-feedback-neither")
            assert neither.inner_text() == "Neither"
            neither.click()
            note = unknown.locator(".dl-feedback-ok")
            note.wait_for(timeout=30_000)
            assert "Feedback recorded: it is neither dandelion nor grass" in note.inner_text()

            # History: newest first, CSV download carries prediction ids and feedback.
            page.wait_for_function(
                "document.querySelectorAll('.dl-history tr').length === 5", timeout=30_000
            )
            rows = page.locator(".dl-history tr")
            assert "notes.txt" in rows.nth(1).inner_text()
            with page.expect_download() as download:
                page.locator(".dl-csv").click()
            assert download.value.suggested_filename == "dandelion-history.csv"
            history = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            names = [p.name for p in uploads][::-1]
            assert [r["file"] for r in history] == ["notes.txt", outside.name, *names]
            assert [r["label"] for r in history] == ["", "unknown", "grass", "dandelion"]
            assert [r["feedback"] for r in history] == ["", "neither", "dandelion", "dandelion"]
            assert history[1]["reason"] == "out_of_domain"
            assert float(history[1]["ood_score"]) > app_model.openset.detector.threshold

            stored = {f.prediction_id: f for f in api.feedback_store().list_feedback()}
            for row in history[1:]:
                record = stored[row["prediction_id"]]
                assert record.correct_label == row["feedback"]
                if row["label"] != "unknown":
                    assert record.predicted_label == row["label"]
                assert record.agree == (row["label"] in (row["feedback"], "unknown"))
                assert record.image_key  # the photo was stored with the feedback
            assert stored[history[1]["prediction_id"]].image_key.startswith("feedback/neither/")

            page.mouse.move(0, 0)
            # Voila scrolls inside its own container: make the window tall enough for all.
            height = page.evaluate("document.querySelector('.dl-app').scrollHeight")
            page.set_viewport_size({"width": 1100, "height": int(height) + 80})
            shot = ARTIFACTS / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("DANDELION_TEST_UPDATE_DOCS") == "1":
                (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, ROOT / "docs" / "img" / "app.png")
                shutil.copyfile(
                    ARTIFACTS / "e2e-1-api-down.png", ROOT / "docs" / "img" / "app-api-down.png"
                )
    assert page.page_errors == []
