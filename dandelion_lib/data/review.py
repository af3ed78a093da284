"""The reviewer's queue over a :class:`~dandelion_lib.data.feedback.FeedbackStore`.

A reviewer works through :meth:`ReviewQueue.pending` (pending feedback, most informative
first) and accepts or rejects it (:meth:`ReviewQueue.review`, or
:meth:`ReviewQueue.review_many` for several at once); accepted photos join the next dataset
version, and :meth:`ReviewQueue.awaiting_dataset` counts those no dataset version has yet.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import case, func, select

from dandelion_lib.core.labels import UNCERTAIN, UNKNOWN
from dandelion_lib.data import dataset
from dandelion_lib.data.feedback import (
    FEEDBACK_SOURCE_PREFIX,
    FeedbackError,
    FeedbackRecord,
    FeedbackRow,
    FeedbackStore,
    PredictionRow,
)


@dataclass(frozen=True)
class ReviewItem:
    """A pending feedback item joined with the prediction it is about.

    ``answer`` is what the model answered (a class, ``uncertain`` or ``unknown``) and
    ``confidence`` its confidence; both are None when the prediction was not recorded.
    """

    feedback: FeedbackRecord
    answer: str | None
    confidence: float | None
    probabilities: dict[str, float]

    @property
    def reason(self) -> str:
        """Why the item is where it is in the queue: ``disagreement``, ``uncertain``,
        ``unknown`` (the model's answer) or ``agreement``."""
        if not self.feedback.agree:
            return "disagreement"
        if self.answer in (UNCERTAIN, UNKNOWN):
            return str(self.answer)
        return "agreement"


@dataclass(frozen=True)
class AwaitingDataset:
    """Accepted feedback photos against the latest dataset version.

    ``count`` is how many accepted photos (with an image) no dataset version has yet: they
    join the next ingestion. ``version`` is the latest dataset version compared against
    (None when there is none yet, or no object store to read it from: then every accepted
    photo counts).
    """

    count: int
    accepted: int
    version: str | None


@dataclass(frozen=True)
class _DatasetPhotos:
    """A dataset version's accepted-feedback sources and the sha256 of its images."""

    version: str | None
    sources: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()


class ReviewQueue:
    """Pending feedback of ``feedback`` in the order a reviewer should see it, the
    reviewer's decisions, and what accepted feedback waits for the next dataset version."""

    def __init__(self, feedback: FeedbackStore):
        self.feedback = feedback
        self._photos: _DatasetPhotos | None = None

    def pending(self, limit: int | None = 50) -> list[ReviewItem]:
        """Pending (not yet reviewed) feedback, most informative first.

        The order, key by key:

        1. disagreements first: the user's label is not what the model said
           (``agree`` is false, see :func:`~dandelion_lib.data.feedback.agrees`);
        2. then answers the model was unsure of: ``uncertain`` or ``unknown`` before a
           class answer;
        3. then lowest confidence first (an item whose prediction was not recorded, so
           without a confidence, after those with one);
        4. then oldest feedback first, then by feedback id (a stable order).

        Each item carries its prediction's answer, confidence and probabilities.
        """
        unsure = case((PredictionRow.label.in_((UNCERTAIN, UNKNOWN)), 0), else_=1)
        query = (
            select(
                FeedbackRow,
                PredictionRow.label,
                PredictionRow.confidence,
                PredictionRow.probabilities,
            )
            .outerjoin(PredictionRow, PredictionRow.prediction_id == FeedbackRow.prediction_id)
            .where(FeedbackRow.reviewed_at.is_(None))
            .order_by(
                case((FeedbackRow.agree.is_(False), 0), else_=1),
                unsure,
                case((PredictionRow.confidence.is_(None), 1), else_=0),
                PredictionRow.confidence.asc(),
                FeedbackRow.created_at.asc(),
                FeedbackRow.feedback_id.asc(),
            )
        )
        if limit is not None:
            query = query.limit(limit)
        with self.feedback.session() as session:
            return [
                ReviewItem(
                    feedback=FeedbackRecord.from_row(row),
                    answer=answer,
                    confidence=None if confidence is None else float(confidence),
                    probabilities=dict(probabilities or {}),
                )
                for row, answer, confidence, probabilities in session.execute(query)
            ]

    def count_pending(self) -> int:
        """How many feedback items wait for a reviewer's decision."""
        query = (
            select(func.count()).select_from(FeedbackRow).where(FeedbackRow.reviewed_at.is_(None))
        )
        with self.feedback.session() as session:
            return int(session.scalar(query) or 0)

    def review(self, feedback_id: str, accepted: bool) -> FeedbackRecord:
        """A reviewer's decision: accepted feedback images may join the next dataset."""
        return self.review_many([feedback_id], accepted)[0]

    def review_many(self, feedback_ids: Iterable[str], accepted: bool) -> list[FeedbackRecord]:
        """One decision for several feedback items, in one transaction: all of them are
        decided, or (an unknown id, a database error) none is. Returns the records in the
        order given (each id once). A decision may be changed later by another one."""
        ids = list(dict.fromkeys(feedback_ids))
        if not ids:
            return []
        with self.feedback.session(write=True) as session:
            rows: dict[str, FeedbackRow] = {}
            for start in range(0, len(ids), 500):  # bounded IN lists
                chunk = ids[start : start + 500]
                query = select(FeedbackRow).where(FeedbackRow.feedback_id.in_(chunk))
                rows.update((r.feedback_id, r) for r in session.scalars(query))
            missing = [i for i in ids if i not in rows]
            if missing:
                raise FeedbackError(_no_feedback(missing))
            now = dt.datetime.now(dt.UTC)
            for row in rows.values():
                row.reviewed_at = now
                row.accepted = accepted
        return [FeedbackRecord.from_row(rows[i]) for i in ids]

    def awaiting_dataset(self) -> AwaitingDataset:
        """Accepted photos that the latest dataset version does not have yet.

        An accepted photo is in the latest version when its manifest lists it as
        ``feedback:<feedback id>``, or lists the same image (its sha256, which names the stored
        photo): identical bytes from another source collapse into one manifest row, and under
        another label the photo is a conflict that ingestion leaves out (the dataset's label
        stands, see :mod:`dandelion_lib.data.provenance`). So this is what the next ingestion
        will add. The manifest is read once per version.
        """
        records = self.feedback.accepted()
        photos = self._latest_dataset()
        waiting = 0
        for r in records:
            sha = Path(r.image_key or "").stem
            source = f"{FEEDBACK_SOURCE_PREFIX}{r.feedback_id}"
            if source not in photos.sources and sha not in photos.images:
                waiting += 1
        return AwaitingDataset(count=waiting, accepted=len(records), version=photos.version)

    def _latest_dataset(self) -> _DatasetPhotos:
        """The latest dataset version's photos (none without a store or a version)."""
        store = self.feedback.store
        if store is None:
            return _DatasetPhotos(None)
        try:
            version = dataset.latest_version(store)
        except dataset.DatasetNotFoundError:
            return _DatasetPhotos(None)
        if self._photos is None or self._photos.version != version:
            df = dataset.load_manifest(store, version)
            sources = df["source"].astype(str)
            self._photos = _DatasetPhotos(
                version,
                frozenset(s for s in sources if s.startswith(FEEDBACK_SOURCE_PREFIX)),
                frozenset(df["sha256"].astype(str)),
            )
        return self._photos


def _no_feedback(missing: list[str]) -> str:
    """The error of a decision on unknown ids (the first five named)."""
    shown = ", ".join(repr(i) for i in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    plural = "s" if len(missing) > 1 else ""
    return f"no feedback with id{plural} {shown}{more}"
