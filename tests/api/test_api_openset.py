"""Open-set answers through the real API process: a model with an open-set detector answers a
photo that is neither class ``unknown`` (reason ``out_of_domain``), counts it, shows its
detector on ``GET /model`` and accepts ``neither`` feedback.

The model is the tiny colour model assembled as backbone + ``head`` with a real detector
fitted on ood-dev negatives (``fit_openset`` in conftest.py). It is registered as a new
version of the API tests' model and gets the ``champion`` alias for this module only; the
previous champion is given the alias back afterwards, so the other modules see no change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dandelion_lib.core.labels import DEFAULT_LABELS as LABELS
from tests.api.conftest import ApiServer, OpenSetParts, fit_openset, mean_colour

UNKNOWN_METRIC = 'dandelion_predictions_total{label="unknown"}'


@dataclass
class Served:
    server: ApiServer
    version: str
    parts: OpenSetParts

    @property
    def threshold(self) -> float:
        value = self.parts.detector.threshold
        assert value is not None
        return float(value)


@pytest.fixture(scope="module")
def served(api_server: ApiServer, greenr_dir: Path) -> Iterator[Served]:
    registry = api_server.registry
    previous = api_server.model()["version"]
    parts = fit_openset(greenr_dir, registry.parts)
    version = registry.register_openset(parts.detector)
    registry.set_alias(version)
    try:
        api_server.wait_for_version(version, timeout=120)
        yield Served(api_server, version, parts)
    finally:
        registry.set_alias(previous)
        api_server.wait_for_version(previous, timeout=120)


def _counter(client: Any, sample: str) -> float:
    """A counter sample from ``/metrics`` (0 before its first increment)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _check_unknown(body: dict[str, Any], served: Served, image: bytes) -> None:
    assert body["label"] == "unknown" and body["reason"] == "out_of_domain"
    assert body["ood_score"] > served.threshold
    expected = float(served.parts.detector.score(mean_colour(image)[None])[0])
    assert body["ood_score"] == pytest.approx(expected, abs=1e-3)
    # The classifier's own view is still reported: its probabilities over the two classes.
    assert set(body["probabilities"]) == set(LABELS)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["model"]["version"] == served.version


def test_out_of_domain_photo_is_answered_unknown_and_counted(served: Served) -> None:
    image = served.parts.unknown_photo.read_bytes()
    with served.server.client() as c:
        before = _counter(c, UNKNOWN_METRIC)
        r = c.post("/predict", files={"file": ("object.jpg", image, "image/jpeg")})
        assert r.status_code == 200, r.text
        _check_unknown(r.json(), served, image)
        assert _counter(c, UNKNOWN_METRIC) == before + 1
        raw = c.post("/predict", content=image, headers={"content-type": "image/jpeg"})
        assert raw.status_code == 200 and raw.json()["label"] == "unknown"
        assert _counter(c, UNKNOWN_METRIC) == before + 2


def test_in_domain_photo_is_not_unknown(served: Served) -> None:
    image = served.parts.in_domain_photo.read_bytes()
    with served.server.client() as c:
        before = _counter(c, UNKNOWN_METRIC)
        body = c.post("/predict", content=image, headers={"content-type": "image/jpeg"}).json()
        assert _counter(c, UNKNOWN_METRIC) == before
    assert body["label"] == served.parts.in_domain_photo.parent.name
    assert body["reason"] is None
    assert body["ood_score"] is not None and body["ood_score"] <= served.threshold


def test_batch_answers_unknown_per_item(served: Served) -> None:
    unknown = served.parts.unknown_photo.read_bytes()
    known = served.parts.in_domain_photo.read_bytes()
    files = [
        ("files", ("object.jpg", unknown, "image/jpeg")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
        ("files", ("field.jpg", known, "image/jpeg")),
    ]
    with served.server.client() as c:
        before = _counter(c, UNKNOWN_METRIC)
        r = c.post("/predict/batch", files=files)
        assert _counter(c, UNKNOWN_METRIC) == before + 1
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    _check_unknown(results[0]["prediction"], served, unknown)
    assert results[1]["error"]["code"] == "unsupported-image"
    assert results[2]["prediction"]["label"] == served.parts.in_domain_photo.parent.name
    assert results[2]["prediction"]["reason"] is None


def test_model_endpoint_shows_the_detector(served: Served) -> None:
    info = served.server.model()
    assert info["version"] == served.version
    openset = info["openset"]
    assert openset == pytest.approx(served.parts.detector.to_dict())
    assert openset["method"] == "logistic" and openset["retention"] == pytest.approx(0.97)
    assert openset["threshold"] == pytest.approx(served.threshold)


def test_neither_feedback_agrees_with_unknown(served: Served) -> None:
    unknown = served.parts.unknown_photo.read_bytes()
    known = served.parts.in_domain_photo.read_bytes()
    with served.server.client() as c:
        pred = c.post("/predict", files={"file": ("object.jpg", unknown, "image/jpeg")}).json()
        assert pred["label"] == "unknown"
        r = c.post(
            "/feedback",
            data={"prediction_id": pred["prediction_id"], "correct_label": "neither"},
            files={"image": ("object.jpg", unknown, "image/jpeg")},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["correct_label"], body["agree"]) == ("neither", True)
        assert body["image_key"].startswith("feedback/neither/")
        # "neither" on a photo the model answered with a class: the model was wrong.
        other = c.post("/predict", content=known, headers={"content-type": "image/jpeg"}).json()
        assert other["label"] in LABELS
        wrong = c.post(
            "/feedback", json={"prediction_id": other["prediction_id"], "correct_label": "neither"}
        )
        assert wrong.status_code == 201, wrong.text
        assert (wrong.json()["correct_label"], wrong.json()["agree"]) == ("neither", False)
        # "unknown" is an answer, never a label feedback may carry.
        refused = c.post(
            "/feedback", json={"prediction_id": pred["prediction_id"], "correct_label": "unknown"}
        )
        assert refused.status_code == 422 and refused.json()["code"] == "invalid-feedback"
