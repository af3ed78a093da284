"""Feedback (dandelion_lib.feedback) on a real SQLite database and a real local store: a
feedback image is accepted by the same rule as everywhere else (dandelion_lib.images)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from dandelion_lib.feedback import (
    TRAINING_LABELS,
    FeedbackStore,
    InvalidFeedbackError,
    PredictionRecord,
)
from dandelion_lib.storage import LocalStore


def encode(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 160, 40)).save(buf, fmt)
    return buf.getvalue()


def record(store: FeedbackStore, image: bytes) -> str:
    prediction = PredictionRecord(
        prediction_id=hashlib.sha1(image).hexdigest(),
        label="grass",
        top_label="grass",
        confidence=0.9,
        probabilities={"dandelion": 0.1, "grass": 0.9},
        image_sha256=hashlib.sha256(image).hexdigest(),
    )
    store.record_predictions([prediction])
    return prediction.prediction_id


@pytest.fixture
def feedback(tmp_path: Path) -> Iterator[FeedbackStore]:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}", store=LocalStore(tmp_path / "s"))
    yield store
    store.close()


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")])
def test_feedback_image_is_stored_under_its_format(
    feedback: FeedbackStore, fmt: str, ext: str
) -> None:
    image = encode(fmt)
    fb = feedback.add_feedback(record(feedback, image), "dandelion", image)
    assert fb.image_key == f"feedback/dandelion/{hashlib.sha256(image).hexdigest()}.{ext}"
    assert fb.agree is False and fb.predicted_label == "grass"


@pytest.mark.parametrize(
    "image",
    [encode("ICO", (32, 32)), b"<html>no</html>", encode("PNG", (8, 8))],
    ids=["unaccepted-format", "not-an-image", "too-small"],
)
def test_unusable_feedback_image_is_refused(feedback: FeedbackStore, image: bytes) -> None:
    with pytest.raises(InvalidFeedbackError, match="unusable"):
        feedback.add_feedback(record(feedback, image), "dandelion", image)


def test_labels_are_the_training_labels(feedback: FeedbackStore) -> None:
    assert feedback.labels == TRAINING_LABELS == ("dandelion", "grass")
    with pytest.raises(InvalidFeedbackError, match="correct_label"):
        feedback.add_feedback("x", "uncertain")
