"""The reviewer page's widgets (dashboards.review) in-process, without Voila, on a real SQLite
feedback database, a real local store and real reference photos: clicks change the
database, the count follows, rejected feedback never becomes training data."""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import ipywidgets as w
import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.data.feedback import FeedbackRecord, FeedbackStore, PredictionRecord
from dandelion_lib.data.review import ReviewQueue
from dashboards.review import ReviewPage
from tests.app.conftest import dead_url

_ids = itertools.count()


def give(
    store: FeedbackStore,
    image: bytes | None,
    *,
    answer: str,
    confidence: float,
    correct: str,
) -> FeedbackRecord:
    classes = ("dandelion", "grass")
    top = answer if answer in classes else (correct if correct in classes else "grass")
    prediction = PredictionRecord(
        prediction_id=f"r{next(_ids):04d}",
        label=answer,
        top_label=top,
        confidence=confidence,
        probabilities={"dandelion": 1 - confidence, "grass": confidence},
        model_name="dandelion",
        model_version="3",
        image_sha256=hashlib.sha256(image).hexdigest() if image else None,
    )
    store.record_predictions([prediction])
    return store.add_feedback(prediction.prediction_id, correct, image)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded feedback database and store; no API (the maps: tests/app/test_explain_view.py)."""
    return Settings(workdir=tmp_path, api_url=dead_url())


@pytest.fixture
def feedback(settings: Settings, greenr_dir: Path) -> Iterator[list[FeedbackRecord]]:
    """Four feedback items, three with photos: two disagreements, one uncertain answer, one
    confident agreement (queue order: wrong_low, wrong_high, unsure, right)."""
    store = FeedbackStore.from_settings(settings)
    photo = lambda label, i: (greenr_dir / label / f"{i:08d}.jpg").read_bytes()  # noqa: E731
    records = [
        give(store, photo("grass", 10), answer="grass", confidence=0.95, correct="grass"),
        give(
            store, photo("dandelion", 11), answer="uncertain", confidence=0.52, correct="dandelion"
        ),
        give(store, photo("dandelion", 12), answer="grass", confidence=0.9, correct="dandelion"),
        give(store, None, answer="dandelion", confidence=0.65, correct="neither"),
    ]
    store.close()
    yield records


@pytest.fixture
def page(settings: Settings, feedback: list[FeedbackRecord]) -> Iterator[ReviewPage]:
    rp = ReviewPage.from_settings(settings, refresh_interval_s=0)
    rp.refresh()
    yield rp
    rp.stop()


def waiting(page: ReviewPage) -> int:
    match = re.search(r'dl-count-waiting">(\d+)<', page.count.value)
    assert match, page.count.value
    return int(match[1])


def pending(page: ReviewPage) -> int:
    match = re.search(r'dl-count-pending">(\d+)<', page.count.value)
    assert match, page.count.value
    return int(match[1])


def test_the_queue_shows_photo_answer_label_and_version_most_informative_first(
    page: ReviewPage, feedback: list[FeedbackRecord]
) -> None:
    right, unsure, wrong_high, no_photo = feedback
    assert list(page.cards) == [
        no_photo.feedback_id,  # disagreement at 0.65
        wrong_high.feedback_id,  # disagreement at 0.90
        unsure.feedback_id,  # uncertain answer
        right.feedback_id,
    ]
    first, second = page.cards[no_photo.feedback_id], page.cards[wrong_high.feedback_id]
    # The photo, read from the store by its key, as a JPEG thumbnail; a placeholder without one.
    image = second.preview
    assert isinstance(image, w.Image) and image.value[:2] == b"\xff\xd8"
    assert isinstance(first.preview, w.HTML) and "no photo sent" in first.preview.value
    text = second.text.value
    for part in ("disagrees", ">grass<", "confidence 90.0 %", "User says: <b>dandelion", "3"):
        assert part in text, part
    assert "neither dandelion nor grass" in first.text.value
    assert "uncertain" in page.cards[unsure.feedback_id].text.value
    assert (waiting(page), pending(page)) == (0, 4)
    assert "no dataset version yet" in page.count.value


def test_without_the_api_each_photo_card_says_so_in_one_line(
    page: ReviewPage, settings: Settings, feedback: list[FeedbackRecord]
) -> None:
    """The maps come from the API; when nothing answers there, each card with a photo says
    so beside it (no traceback) and the queue, the photos and the count are all there."""
    no_photo = feedback[3]
    assert page.cards[no_photo.feedback_id].looked is None
    with_photo = [c for fid, c in page.cards.items() if fid != no_photo.feedback_id]
    assert len(with_photo) == 3
    for card in with_photo:
        assert card.looked is not None
        (line,) = card.looked.children
        assert isinstance(line, w.HTML) and "dl-looked-none" in line.value
        assert f"No map: cannot reach the API at {settings.serving.api_url}" in line.value
        assert "Traceback" not in line.value
        assert isinstance(card.preview, w.Image)
    assert page.error.layout.display == "none" and pending(page) == 4


def test_accept_and_reject_change_the_database_and_the_count(
    page: ReviewPage, settings: Settings, feedback: list[FeedbackRecord]
) -> None:
    right, unsure, wrong_high, no_photo = feedback
    page.cards[wrong_high.feedback_id].accept.click()
    assert wrong_high.feedback_id not in page.cards
    assert (waiting(page), pending(page)) == (1, 3)
    assert "Accepted 1 item" in page.status.value

    page.cards[no_photo.feedback_id].accept.click()  # accepted, but no photo to learn from
    assert (waiting(page), pending(page)) == (1, 2)
    page.cards[unsure.feedback_id].reject.click()
    assert (waiting(page), pending(page)) == (1, 1)

    store = FeedbackStore.from_settings(settings)
    try:
        decided = {r: store.get_feedback(r.feedback_id) for r in feedback}
        assert decided[wrong_high].accepted is True  # type: ignore[union-attr]
        assert decided[no_photo].accepted is True  # type: ignore[union-attr]
        assert decided[unsure].accepted is False  # type: ignore[union-attr]
        assert decided[right].reviewed_at is None  # type: ignore[union-attr]
        assert [r.feedback_id for r in store.accepted()] == [wrong_high.feedback_id]
    finally:
        store.close()


def test_bulk_actions_decide_the_ticked_items_only(
    page: ReviewPage, settings: Settings, feedback: list[FeedbackRecord]
) -> None:
    right, unsure, wrong_high, no_photo = feedback
    page.accept_selected.click()  # nothing ticked: nothing happens
    assert "Tick some photos first" in page.status.value and pending(page) == 4

    page.cards[unsure.feedback_id].select.value = True
    page.cards[wrong_high.feedback_id].select.value = True
    assert page.selected_ids() == [wrong_high.feedback_id, unsure.feedback_id]
    page.reject_selected.click()
    assert "Rejected 2 items" in page.status.value
    assert list(page.cards) == [no_photo.feedback_id, right.feedback_id]
    assert (waiting(page), pending(page)) == (0, 2)

    page.select_all.value = True
    assert page.selected_ids() == [no_photo.feedback_id, right.feedback_id]
    page.accept_selected.click()
    assert page.cards == {} and "Nothing to review" in page.items.children[0].value
    assert (waiting(page), pending(page)) == (1, 0)

    store = FeedbackStore.from_settings(settings)
    try:
        accepted = {r.feedback_id for r in store.accepted()}
        assert accepted == {right.feedback_id}  # the rejected ones never; no_photo has no image
        assert store.get_feedback(wrong_high.feedback_id).accepted is False  # type: ignore[union-attr]
    finally:
        store.close()


def test_the_count_follows_other_reviewers(
    settings: Settings, feedback: list[FeedbackRecord]
) -> None:
    page = ReviewPage.from_settings(settings, refresh_interval_s=0.2).start()
    other = FeedbackStore.from_settings(settings)
    try:
        assert waiting(page) == 0
        ReviewQueue(other).review_many(
            [feedback[0].feedback_id, feedback[2].feedback_id], accepted=True
        )
        deadline = time.monotonic() + 20
        while waiting(page) != 2:
            assert time.monotonic() < deadline, page.count.value
            time.sleep(0.1)
        assert pending(page) == 2
    finally:
        other.close()
        page.stop()


def test_an_unavailable_database_is_one_line_on_the_page(
    tmp_path: Path, feedback: list[FeedbackRecord]
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    broken = Settings(workdir=tmp_path, feedback_db_url=f"sqlite:///{blocker}/feedback.db")
    page = ReviewPage.from_settings(broken, refresh_interval_s=0)
    try:
        assert page.refresh() is False
        assert "unavailable" in page.error.value or "cannot" in page.error.value
        assert "Traceback" not in page.error.value
        assert page.error.layout.display is None  # shown
        assert page.decide(["x"], True) is False and "Nothing was changed" in page.status.value
    finally:
        page.stop()


def test_a_missing_photo_gets_a_placeholder(
    settings: Settings, feedback: list[FeedbackRecord], tmp_path: Path
) -> None:
    key = feedback[2].image_key
    assert key
    (tmp_path / "store" / key).unlink()
    page = ReviewPage.from_settings(settings, refresh_interval_s=0)
    try:
        assert page.refresh()
        card = page.cards[feedback[2].feedback_id]
        assert isinstance(card.preview, w.HTML) and "photo unavailable" in card.preview.value
        assert card.looked is None  # nothing to draw a map on
    finally:
        page.stop()


def test_the_dashboards_decode_photos_under_the_library_pixel_limit() -> None:
    """Without an explicit limit the pages refuse what the library refuses (the settings'
    default of ``images.max_image_pixels``), not a figure of their own."""
    import inspect

    from dandelion_lib.core.config import ImageSettings
    from dashboards.ui import DandelionApp

    limit = ImageSettings().max_image_pixels
    for page in (ReviewPage, DandelionApp):
        default = inspect.signature(page).parameters["max_image_pixels"].default
        assert default == limit, page
