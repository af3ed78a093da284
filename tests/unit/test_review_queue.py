"""The reviewer's queue, bulk decisions and the count of accepted photos waiting for the next
dataset, on a real SQLite feedback database, a real local store and real reference photos."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from dandelion_lib.core.config import Settings
from dandelion_lib.core.storage import open_store
from dandelion_lib.data import ingest
from dandelion_lib.data.feedback import (
    FeedbackError,
    FeedbackRecord,
    FeedbackStore,
    PredictionRecord,
)
from dandelion_lib.data.review import ReviewQueue

_ids = itertools.count()


def photo(greenr: Path, label: str, index: int) -> bytes:
    return (greenr / label / f"{index:08d}.jpg").read_bytes()


def give(
    store: FeedbackStore,
    image: bytes | None,
    *,
    answer: str,
    top: str,
    confidence: float,
    correct: str,
    record: bool = True,
) -> FeedbackRecord:
    """A served prediction (recorded as the API does, unless ``record`` is false) and the
    user's feedback on it."""
    prediction = PredictionRecord(
        prediction_id=f"p{next(_ids):04d}",
        label=answer,
        top_label=top,
        confidence=confidence,
        probabilities={top: confidence, ("grass" if top == "dandelion" else "dandelion"): 0.0},
        model_version="7",
        image_sha256=hashlib.sha256(image).hexdigest() if image else None,
    )
    if record:
        store.record_predictions([prediction])
    return store.add_feedback(prediction.prediction_id, correct, image, prediction=prediction)


@pytest.fixture
def settings(tmp_path: Path, greenr_dir: Path) -> Settings:
    return Settings(
        workdir=tmp_path,
        source=str(greenr_dir),
        max_per_class=20,
        min_images_per_class=20,
        negatives_source=None,
    )


@pytest.fixture
def feedback(settings: Settings) -> Iterator[FeedbackStore]:
    store = FeedbackStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture
def queue(feedback: FeedbackStore) -> ReviewQueue:
    return ReviewQueue(feedback)


def test_the_queue_puts_disagreements_then_unsure_answers_then_low_confidence_first(
    feedback: FeedbackStore, queue: ReviewQueue, greenr_dir: Path
) -> None:
    g = greenr_dir
    confident_right = give(
        feedback,
        photo(g, "grass", 1),
        answer="grass",
        top="grass",
        confidence=0.97,
        correct="grass",
    )
    less_sure_right = give(
        feedback,
        photo(g, "grass", 2),
        answer="grass",
        top="grass",
        confidence=0.71,
        correct="grass",
    )
    uncertain_right = give(
        feedback,
        photo(g, "dandelion", 3),
        answer="uncertain",
        top="dandelion",
        confidence=0.55,
        correct="dandelion",
    )
    unknown_right = give(
        feedback,
        photo(g, "grass", 4),
        answer="unknown",
        top="grass",
        confidence=0.9,
        correct="neither",
    )
    confident_wrong = give(
        feedback,
        photo(g, "dandelion", 5),
        answer="grass",
        top="grass",
        confidence=0.93,
        correct="dandelion",
    )
    unsure_wrong = give(
        feedback,
        photo(g, "dandelion", 6),
        answer="uncertain",
        top="grass",
        confidence=0.58,
        correct="dandelion",
    )
    unrecorded_wrong = give(
        feedback,
        None,
        answer="grass",
        top="grass",
        confidence=0.8,
        correct="dandelion",
        record=False,
    )
    low_wrong = give(
        feedback,
        photo(g, "grass", 7),
        answer="dandelion",
        top="dandelion",
        confidence=0.62,
        correct="grass",
    )

    shown = queue.pending()
    expected = [
        unsure_wrong,  # disagreement, uncertain answer
        low_wrong,  # disagreement, class answer, 0.62
        confident_wrong,  # disagreement, 0.93
        unrecorded_wrong,  # disagreement, no recorded prediction: no confidence, last
        uncertain_right,  # agreement, uncertain answer 0.55
        unknown_right,  # agreement, unknown answer 0.90
        less_sure_right,  # agreement, class answer 0.71
        confident_right,
    ]
    assert [i.feedback.feedback_id for i in shown] == [r.feedback_id for r in expected]
    assert [i.reason for i in shown] == [
        "disagreement",
        "disagreement",
        "disagreement",
        "disagreement",
        "uncertain",
        "unknown",
        "agreement",
        "agreement",
    ]
    first = shown[0]
    assert (first.answer, first.confidence, first.feedback.correct_label) == (
        "uncertain",
        0.58,
        "dandelion",
    )
    assert first.feedback.model_version == "7" and first.feedback.image_key
    assert shown[3].answer is None and shown[3].confidence is None
    assert [i.feedback.feedback_id for i in queue.pending(limit=2)] == [
        unsure_wrong.feedback_id,
        low_wrong.feedback_id,
    ]
    assert queue.count_pending() == 8

    # Decided items leave the queue, whatever the decision.
    queue.review(unsure_wrong.feedback_id, accepted=True)
    queue.review(low_wrong.feedback_id, accepted=False)
    assert queue.pending(limit=1)[0].feedback.feedback_id == confident_wrong.feedback_id
    assert queue.count_pending() == 6


def test_bulk_decisions_apply_to_all_or_none(
    feedback: FeedbackStore, queue: ReviewQueue, greenr_dir: Path
) -> None:
    items = [
        give(
            feedback,
            photo(greenr_dir, "dandelion", i),
            answer="grass",
            top="grass",
            confidence=0.7,
            correct="dandelion",
        )
        for i in range(4)
    ]
    ids = [r.feedback_id for r in items]

    with pytest.raises(FeedbackError, match="no feedback with id 'missing'"):
        queue.review_many([ids[0], "missing", ids[1]], accepted=True)
    assert queue.count_pending() == 4 and feedback.accepted() == []  # nothing decided

    accepted = queue.review_many([ids[0], ids[1], ids[0]], accepted=True)
    assert [r.feedback_id for r in accepted] == ids[:2]
    assert all(r.accepted and r.reviewed_at for r in accepted)
    rejected = queue.review_many(ids[2:], accepted=False)
    assert all(r.accepted is False and r.reviewed_at for r in rejected)
    assert queue.review_many([], accepted=True) == []

    assert {r.feedback_id for r in feedback.accepted()} == set(ids[:2])  # never the rejected
    assert queue.pending() == []
    stored = feedback.get_feedback(ids[3])
    assert stored is not None and stored.accepted is False


def test_accepted_photos_wait_until_a_dataset_version_has_them(
    feedback: FeedbackStore, queue: ReviewQueue, settings: Settings, greenr_dir: Path
) -> None:
    # A photo of the reference set itself (the same bytes: one manifest row) and a new one.
    known = give(
        feedback,
        photo(greenr_dir, "grass", 3),
        answer="dandelion",
        top="dandelion",
        confidence=0.6,
        correct="grass",
    )
    new = give(
        feedback,
        photo(greenr_dir, "dandelion", 150),
        answer="grass",
        top="grass",
        confidence=0.6,
        correct="dandelion",
    )
    rejected = give(
        feedback,
        photo(greenr_dir, "dandelion", 151),
        answer="grass",
        top="grass",
        confidence=0.6,
        correct="dandelion",
    )
    no_image = give(
        feedback, None, answer="grass", top="grass", confidence=0.6, correct="dandelion"
    )
    queue.review_many([known.feedback_id, new.feedback_id, no_image.feedback_id], True)
    queue.review(rejected.feedback_id, accepted=False)

    before = queue.awaiting_dataset()
    assert (before.count, before.accepted, before.version) == (2, 2, None)  # no dataset yet

    report = ingest.ingest(settings, store=open_store(settings=settings), progress=False)
    after = queue.awaiting_dataset()
    assert (after.count, after.accepted, after.version) == (0, 2, report.version)

    later = give(
        feedback,
        photo(greenr_dir, "grass", 152),
        answer="dandelion",
        top="dandelion",
        confidence=0.6,
        correct="grass",
    )
    assert queue.awaiting_dataset().count == 0  # not accepted yet
    queue.review(later.feedback_id, accepted=True)
    assert queue.awaiting_dataset().count == 1


def test_the_command_line_shows_the_queue_and_decides_several_at_once(
    feedback: FeedbackStore,
    queue: ReviewQueue,
    settings: Settings,
    greenr_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from dandelion_lib import cli
    from dandelion_lib.core import config

    right = give(
        feedback,
        photo(greenr_dir, "grass", 30),
        answer="grass",
        top="grass",
        confidence=0.9,
        correct="grass",
    )
    wrong = give(
        feedback,
        photo(greenr_dir, "dandelion", 31),
        answer="grass",
        top="grass",
        confidence=0.9,
        correct="dandelion",
    )
    monkeypatch.setenv("DANDELION_WORKDIR", str(settings.workdir_path))
    config.get_settings.cache_clear()
    try:
        assert cli.main(["feedback", "queue", "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["feedback_id"], r["reason"]) for r in rows] == [
            (wrong.feedback_id, "disagreement"),
            (right.feedback_id, "agreement"),
        ]
        assert rows[0]["answer"] == "grass" and rows[0]["confidence"] == 0.9

        ids = [wrong.feedback_id, right.feedback_id]
        assert cli.main(["feedback", "review", *ids, "nope", "--reject"]) == 2
        assert "no feedback with id 'nope'" in capsys.readouterr().err
        assert queue.count_pending() == 2  # all or nothing
        assert cli.main(["feedback", "review", *ids, "--accept"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2
        assert {r.feedback_id for r in feedback.accepted()} == set(ids)
    finally:
        config.get_settings.cache_clear()
