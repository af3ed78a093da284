"""Feedback (dandelion_lib.data.feedback) on a real SQLite database and a real local store: a
feedback image is accepted by the same rule as everywhere else (dandelion_lib.core.images)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from dandelion_lib.core.storage import LocalStore
from dandelion_lib.data.feedback import (
    TRAINING_LABELS,
    FeedbackStore,
    InvalidFeedbackError,
    PredictionRecord,
)


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


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("PNG", "png")])
def test_feedback_image_is_stored_under_its_format(
    feedback: FeedbackStore, fmt: str, ext: str
) -> None:
    image = encode(fmt)
    fb = feedback.add_feedback(record(feedback, image), "dandelion", image)
    assert fb.image_key == f"feedback/dandelion/{hashlib.sha256(image).hexdigest()}.{ext}"
    assert fb.agree is False and fb.predicted_label == "grass"
    assert feedback.store is not None and feedback.store.get_bytes(fb.image_key) == image


def zip_payload() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("index.html", "<html><script>alert(1)</script></html>")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_only_the_image_of_a_feedback_upload_is_stored(feedback: FeedbackStore, fmt: str) -> None:
    """A photo with a ZIP appended (a polyglot) is matched by the bytes as predicted but
    stored without the payload."""
    clean = encode(fmt)
    polyglot = clean + zip_payload()
    fb = feedback.add_feedback(record(feedback, polyglot), "dandelion", polyglot)
    assert fb.image_sha256 == hashlib.sha256(polyglot).hexdigest()  # the prediction's
    assert fb.image_key is not None and feedback.store is not None
    stored = feedback.store.get_bytes(fb.image_key)
    assert stored == clean and not zipfile.is_zipfile(io.BytesIO(stored))
    assert hashlib.sha256(clean).hexdigest() in fb.image_key


def test_a_comment_in_a_feedback_jpeg_is_not_stored(feedback: FeedbackStore) -> None:
    """A `<script>` in a JPEG comment (COM) segment was stored verbatim."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 160, 40)).save(buf, "JPEG", comment=b"<script>x()</script>")
    image = buf.getvalue()
    fb = feedback.add_feedback(record(feedback, image), "dandelion", image)
    assert fb.image_key is not None and fb.image_key.endswith(".jpg")
    assert feedback.store is not None
    stored = feedback.store.get_bytes(fb.image_key)
    assert b"<script>" not in stored and len(stored) < len(image)
    assert Image.open(io.BytesIO(stored)).tobytes() == Image.open(io.BytesIO(image)).tobytes()


def test_a_bmp_feedback_image_is_stored_as_png_pixels(feedback: FeedbackStore) -> None:
    """BMP has no reliable end marker: its decoded pixels are stored, re-encoded as PNG."""
    image = encode("BMP") + b"<html>payload</html>"
    fb = feedback.add_feedback(record(feedback, image), "dandelion", image)
    assert fb.image_key is not None and fb.image_key.endswith(".png")
    assert feedback.store is not None
    stored = Image.open(io.BytesIO(feedback.store.get_bytes(fb.image_key)))
    assert stored.format == "PNG"
    assert stored.convert("RGB").tobytes() == Image.open(io.BytesIO(image)).convert("RGB").tobytes()


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
