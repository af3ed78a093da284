"""The app's view model and HTML rendering: pure functions on real images and real values."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dashboards.client import (
    History,
    ModelInfo,
    Result,
    csv_columns,
    make_thumbnail,
    problem_message,
)
from dashboards.ui import (
    csv_link_html,
    history_html,
    label_colors,
    label_html,
    probability_bar_html,
    result_summary_html,
    title,
)

# The fast tier (`nox -s unit`): no servers, no training.
pytestmark = pytest.mark.unit

LABELS = ("dandelion", "grass")


def _result(label: str | None, **kw: object) -> Result:
    p = {"dandelion": 0.91, "grass": 0.09}
    base: dict[str, object] = {
        "filename": "a.jpg",
        "size": 10,
        "label": label,
        "probabilities": p if label else {},
        "confidence": 0.91 if label else None,
        "prediction_id": "p1" if label else None,
    }
    base.update(kw)
    return Result(**base)  # type: ignore[arg-type]


def test_model_headline() -> None:
    info = ModelInfo.from_json(
        {
            "name": "dandelion",
            "version": 7,
            "alias": "champion",
            "metrics": {"test_accuracy": 0.9625},
        }
    )
    assert info.headline == "dandelion v7 (champion) · test accuracy 96.2 %"
    assert ModelInfo.from_json({"name": "m", "version": "1"}).headline.endswith("accuracy n/a")
    assert ModelInfo.from_json({"name": "m", "version": "1", "loaded_at": 0}).loaded_at == (
        "1970-01-01T00:00:00+00:00"
    )


def test_feedback_choices() -> None:
    assert _result("dandelion").feedback_choices() == [
        ("Correct", "dandelion"),
        ("Wrong: it is grass", "grass"),
        ("Neither", "neither"),
    ]
    assert _result("grass").feedback_choices()[1] == ("Wrong: it is dandelion", "dandelion")
    for answer in ("uncertain", "unknown"):
        assert _result(answer).feedback_choices() == [
            ("It is dandelion", "dandelion"),
            ("It is grass", "grass"),
            ("Neither", "neither"),
        ]
    assert _result(None, error="not an image").feedback_choices() == []


def test_unknown_says_neither_class_in_its_own_colour() -> None:
    result = _result("unknown", reason="out_of_domain", ood_score=1.25)
    assert result.unknown and not result.uncertain
    html = result_summary_html(result, LABELS)
    assert "dl-label-unknown" in html
    assert "This doesn&#x27;t look like a dandelion or a grass photo" in html
    assert "not confident" not in html and "confidence" not in html
    colors = label_colors(LABELS)
    assert colors["unknown"] not in (colors["uncertain"], colors["dandelion"], colors["grass"])
    assert f"background:{colors['unknown']}" in label_html("unknown", LABELS)
    uncertain = result_summary_html(_result("uncertain", confidence=0.55), LABELS)
    assert "look like" not in uncertain
    row = result.row(LABELS)
    assert (row["label"], row["reason"], row["ood_score"]) == ("unknown", "out_of_domain", 1.25)
    assert row["confidence"] == 0.91  # kept in the CSV, not shown in the table
    history = History(LABELS)
    history.add(result)
    assert "91.0 %" not in history_html(history) and "<td>unknown</td>" in history_html(history)


def test_uncertain_and_errors_are_shown_as_such() -> None:
    uncertain = result_summary_html(_result("uncertain", confidence=0.55), LABELS)
    assert "dl-label-uncertain" in uncertain
    assert "not confident enough" in uncertain
    assert "55.0 %" in uncertain
    sure = result_summary_html(_result("grass"), LABELS)
    assert "dl-label-grass" in sure and "not confident" not in sure
    failed = result_summary_html(_result(None, error="the file is not a decodable image"), LABELS)
    assert "dl-error" in failed and "not a decodable image" in failed


def test_user_controlled_text_is_escaped() -> None:
    name = '<img src=x onerror="alert(1)">.jpg'
    html = result_summary_html(_result(None, filename=name, error="<b>bad</b>"), LABELS)
    assert "<img" not in html and "<b>bad" not in html
    history = History(LABELS)
    history.add(_result("grass", filename=name))
    assert "<img" not in history_html(history)


def test_probability_bar() -> None:
    bar = probability_bar_html({"dandelion": 0.25, "grass": 0.75})
    assert 'class="dl-bar-dandelion" style="width:25.00%' in bar
    assert 'class="dl-bar-grass" style="width:75.00%' in bar
    assert "dandelion 25.0 % · grass 75.0 %" in bar


def test_history_is_newest_first_and_exports_csv() -> None:
    history = History(LABELS)
    history.add(_result("dandelion", filename="first.jpg"))
    history.add(_result(None, filename="second.txt", error="not an image"))
    history.add(_result("grass", filename="third.jpg", feedback="dandelion"))
    rows = list(csv.DictReader(io.StringIO(history.to_csv().decode())))
    assert [r["file"] for r in rows] == ["third.jpg", "second.txt", "first.jpg"]
    assert tuple(rows[0]) == csv_columns(LABELS)
    assert tuple(c for c in rows[0] if c.startswith("p_")) == ("p_dandelion", "p_grass")
    assert rows[0]["feedback"] == "dandelion" and rows[1]["error"] == "not an image"
    assert float(rows[2]["p_dandelion"]) == 0.91
    html = history_html(history)
    assert html.index("third.jpg") < html.index("second.txt") < html.index("first.jpg")
    assert 'download="dandelion-history.csv"' in csv_link_html(history)
    assert csv_link_html(History(LABELS)) == ""


def test_other_labels_name_the_columns_colours_and_title() -> None:
    """With ``DANDELION_LABELS`` set to other classes the app follows them: nothing in the
    app names dandelion or grass itself."""
    labels = ("daisy", "clover", "moss")
    result = Result(
        filename="a.jpg",
        size=1,
        label="clover",
        probabilities={"daisy": 0.1, "clover": 0.8, "moss": 0.1},
        confidence=0.8,
        prediction_id="p1",
    )
    history = History(labels)
    history.add(result)
    rows = list(csv.DictReader(io.StringIO(history.to_csv().decode())))
    assert [c for c in rows[0] if c.startswith("p_")] == ["p_daisy", "p_clover", "p_moss"]
    assert float(rows[0]["p_clover"]) == 0.8
    colors = label_colors(labels)
    assert len({colors[lab] for lab in (*labels, "uncertain", "unknown")}) == 5
    assert f"background:{colors['clover']}" in result_summary_html(result, labels)
    assert title(labels) == "Daisy or clover or moss?" and title(LABELS) == "Dandelion or grass?"


def test_thumbnails(greenr_dir: Path) -> None:
    data = (greenr_dir / "dandelion" / "00000000.jpg").read_bytes()
    thumb = make_thumbnail(data, size=160)
    assert thumb is not None
    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "JPEG" and max(img.size) <= 160
    assert make_thumbnail(b"not an image") is None
    # A PNG whose header claims 100k x 100k pixels is refused before any decoding.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    bomb = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    assert make_thumbnail(bomb) is None


def test_problem_message() -> None:
    problem = httpx.Response(
        415,
        json={
            "type": "about:blank",
            "title": "Unsupported Media Type",
            "status": 415,
            "detail": "not an image\nsecond line",
        },
    )
    assert problem_message(problem) == "not an image"
    assert problem_message(httpx.Response(503, json={"reason": "model loading"})) == "model loading"
    assert problem_message(httpx.Response(502, text="<html>")) == "HTTP 502 Bad Gateway"
