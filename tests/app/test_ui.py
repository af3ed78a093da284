"""The app's widgets driven in-process (no browser) against the real API and model.

The ``TcpRelay`` in front of the API is plain loopback TCP forwarding: closing it is the API
going away for the app, reopening it is the API coming back, without restarting the API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ipywidgets as w

from dashboards.client import ApiClient
from dashboards.ui import DandelionApp
from tests.app.conftest import APP_MODEL, AppApi, TcpRelay, upload_entry


def _buttons(widget: Any) -> list[w.Button]:
    if isinstance(widget, w.Button):
        return [widget]
    return [b for child in getattr(widget, "children", ()) for b in _buttons(child)]


def _html(widget: Any) -> str:
    if isinstance(widget, w.HTML):
        return widget.value
    return "".join(_html(child) for child in getattr(widget, "children", ()))


def test_upload_results_history_and_feedback(app_api: AppApi, greenr_dir: Path) -> None:
    dandelion = (greenr_dir / "dandelion" / "00000002.jpg").read_bytes()
    grass = (greenr_dir / "grass" / "00000002.jpg").read_bytes()
    app = DandelionApp(ApiClient(app_api.url))
    app.check()
    assert app.banner.layout.display == "none" and not app.upload.disabled
    assert f"{APP_MODEL} v{app_api.version} (champion) · test accuracy 70.0 %" in app.header.value

    # What the browser does: set the upload's value; the app classifies and clears it.
    app.upload.value = (
        upload_entry("dandelion.jpg", dandelion),
        upload_entry("grass.jpg", grass),
        upload_entry("notes.txt", b"not an image"),
    )
    assert app.upload.value == ()
    cards = app.results.children
    assert len(cards) == 3  # newest first
    assert "notes.txt" in _html(cards[0]) and "Not classified" in _html(cards[0])
    assert isinstance(cards[0].children[0], w.HTML)  # no preview for a non-image
    assert isinstance(cards[2].children[0], w.Image)  # a thumbnail for a photo
    results = list(app.history)
    assert [r.filename for r in results] == ["notes.txt", "grass.jpg", "dandelion.jpg"]
    for card, result in zip(cards[1:], results[1:], strict=True):
        assert f"dl-label-{result.label}" in _html(card)
        assert f"dl-result-{result.label}" in card._dom_classes
    assert _buttons(cards[0]) == []

    # Feedback: the first button of the dandelion card says it is a dandelion.
    first = _buttons(cards[2])[0]
    first.click()
    assert all(b.disabled for b in _buttons(cards[2])) and first.button_style == "success"
    assert "Feedback recorded: it is dandelion" in _html(cards[2])
    stored = app_api.feedback_store().list_feedback()
    mine = [f for f in stored if f.prediction_id == results[2].prediction_id]
    assert len(mine) == 1 and mine[0].correct_label == "dandelion" and mine[0].image_key
    assert results[2].feedback == "dandelion"
    csv_rows = app.history.to_csv().decode().splitlines()
    assert len(csv_rows) == 4 and csv_rows[3].split(",")[9] == "dandelion"
    assert "Download history (CSV)" in app.download.value


def test_unknown_card_and_neither_feedback(app_api: AppApi) -> None:
    photo = app_api.openset.unknown_photo  # an ood-dev object the model's detector rejects
    app = DandelionApp(ApiClient(app_api.url))
    app.check()
    (result,) = app.classify([(photo.name, photo.read_bytes())])
    assert result.label == "unknown"
    (card,) = app.results.children
    assert "dl-result-unknown" in card._dom_classes
    assert isinstance(card.children[0], w.Image)  # the photo is shown
    html = _html(card)
    assert "dl-label-unknown" in html
    assert "This doesn&#x27;t look like a dandelion or a grass photo" in html
    assert "dl-bar" not in html  # no class shares for a photo of neither class
    buttons = {b.description: b for b in _buttons(card)}
    assert list(buttons) == ["It is dandelion", "It is grass", "Neither"]
    buttons["Neither"].click()
    assert buttons["Neither"].button_style == "success"
    assert "Feedback recorded: it is neither dandelion nor grass" in _html(card)
    stored = app_api.feedback_store().list_feedback()
    mine = [f for f in stored if f.prediction_id == result.prediction_id]
    assert len(mine) == 1 and mine[0].correct_label == "neither" and mine[0].agree
    assert result.feedback == "neither"
    assert "<td>unknown</td>" in app.history_table.value


def test_banner_while_api_is_away_and_recovery(app_api: AppApi, greenr_dir: Path) -> None:
    relay = TcpRelay(app_api.url)
    relay.start()
    app = DandelionApp(ApiClient(relay.url, timeout=5), health_interval_s=0.2).start()
    try:
        assert app.health is not None and app.health.ready
        relay.stop()
        _wait(lambda: app.banner.layout.display is None)
        assert "API unavailable" in app.banner.value and app.upload.disabled
        # An upload attempt while away is reported on its card, nothing is lost or raised.
        data = (greenr_dir / "grass" / "00000003.jpg").read_bytes()
        first, second = app.classify([("grass.jpg", data), ("again.jpg", data)])
        assert first.error and "cannot reach the API" in first.error
        assert second.error == f"not sent: {first.error}"  # not tried once the API is away
        relay.start()
        _wait(lambda: app.banner.layout.display == "none")
        assert not app.upload.disabled and app.banner.value == ""
        (result,) = app.classify([("grass.jpg", data)])
        assert result.ok
    finally:
        app.stop()
        relay.stop()


def _wait(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
