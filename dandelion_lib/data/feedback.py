"""User feedback on predictions, stored durably for live accuracy and the next dataset.

Two tables, created on first use with SQLAlchemy (SQLite by default, PostgreSQL in production):

* ``predictions`` — one row per served prediction (label, probabilities, model version,
  sha256 of the image bytes), written by the API so feedback can be matched to what the
  model answered, on any replica;
* ``feedback`` — at most one row per prediction: the label the user says is correct,
  whether the model agreed, and the store key of the image when the user sent it.

Feedback images go to the object store as ``feedback/<correct_label>/<sha256>.<ext>``
before the row that references them is committed, so a row never points at a missing
object. What is stored is the image only (:func:`~dandelion_lib.core.images.canonical_image`:
nothing after the image's end), named by the sha256 of the stored bytes; the row's
``image_sha256`` stays the sha256 of the bytes as sent, which matched the prediction.

A reviewer works through :meth:`FeedbackStore.review_queue` (pending feedback, most
informative first) and accepts or rejects it (:meth:`FeedbackStore.review`, or
:meth:`FeedbackStore.review_many` for several at once); ingestion reads
:meth:`FeedbackStore.accepted` to add reviewed images to the next dataset version, and
:meth:`FeedbackStore.awaiting_dataset` counts the accepted photos no dataset version has yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    String,
    case,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dandelion_lib.core.config import (
    DEFAULT_LABELS,
    NEITHER,
    UNCERTAIN,
    UNKNOWN,
    Settings,
    get_settings,
)
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image, canonical_image
from dandelion_lib.core.storage import ObjectStore, open_store, sha256_hex

TRAINING_LABELS: tuple[str, ...] = DEFAULT_LABELS
"""The training labels feedback may carry (``uncertain`` and ``unknown`` are answers, never
training labels); besides them, feedback may say :data:`NEITHER`."""


def agrees(correct_label: str, prediction: PredictionRecord) -> bool:
    """Whether the model was right: ``neither`` agrees with an ``unknown`` answer, a training
    label with the model's top label."""
    if correct_label == NEITHER:
        return prediction.label == UNKNOWN
    return prediction.top_label == correct_label


class FeedbackError(DandelionError):
    """Base class of feedback errors (one user-facing line)."""


class UnknownPredictionError(FeedbackError):
    """No prediction with that id was recorded."""


class DuplicateFeedbackError(FeedbackError):
    """Feedback for that prediction was already recorded."""


class InvalidFeedbackError(FeedbackError):
    """The feedback itself is unusable (bad label, image that does not match, ...)."""


class FeedbackUnavailableError(FeedbackError):
    """The feedback database cannot be reached."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Base(DeclarativeBase):
    pass


class _PredictionRow(_Base):
    __tablename__ = "predictions"

    prediction_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    label: Mapped[str] = mapped_column(String(32))
    top_label: Mapped[str] = mapped_column(String(32))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(64))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))


class _FeedbackRow(_Base):
    __tablename__ = "feedback"

    feedback_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(String(36), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    correct_label: Mapped[str] = mapped_column(String(32))
    predicted_label: Mapped[str] = mapped_column(String(32))
    agree: Mapped[bool] = mapped_column(Boolean)
    model_name: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(64))
    image_key: Mapped[str | None] = mapped_column(String(512))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    accepted: Mapped[bool | None] = mapped_column(Boolean)


@dataclass(frozen=True)
class PredictionRecord:
    """One served prediction. ``top_label`` is the model's argmax, ``label`` the answer
    given (``uncertain`` below the confidence threshold)."""

    prediction_id: str
    label: str
    top_label: str
    confidence: float
    probabilities: dict[str, float]
    model_name: str | None = None
    model_version: str | None = None
    image_sha256: str | None = None
    request_id: str | None = None
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    feedback_id: str
    prediction_id: str
    correct_label: str
    predicted_label: str
    agree: bool
    model_name: str | None
    model_version: str | None
    image_key: str | None
    image_sha256: str | None
    created_at: dt.datetime
    reviewed_at: dt.datetime | None = None
    accepted: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("created_at", "reviewed_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


FEEDBACK_SOURCE_PREFIX = "feedback:"
"""A dataset manifest's ``source`` of an accepted feedback photo: ``feedback:<feedback id>``
(written by :class:`dandelion_lib.data.ingest.FeedbackSource`)."""


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


def normalize_db_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid URL>"


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes; every value stored here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


class FeedbackStore:
    """Predictions and feedback in a SQL database; feedback images in the object store."""

    def __init__(
        self,
        url: str,
        *,
        store: ObjectStore | None = None,
        labels: Sequence[str] = TRAINING_LABELS,
        max_image_pixels: int | None = None,
        timeout_s: float = 30.0,
    ):
        self.url = normalize_db_url(url)
        self.timeout_s = timeout_s
        self.store = store
        self.labels = tuple(labels)
        self.max_image_pixels = max_image_pixels
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._dataset_cache: tuple[str, frozenset[str], frozenset[tuple[str, str]]] | None = None

    @property
    def feedback_labels(self) -> tuple[str, ...]:
        """What a user may answer: a training label, or ``neither`` (neither class)."""
        return (*self.labels, NEITHER)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> FeedbackStore:
        settings = settings or get_settings()
        return cls(
            settings.resolved_feedback_db_url,
            store=open_store(settings=settings),
            labels=settings.labels,
            max_image_pixels=settings.max_image_pixels,
            timeout_s=settings.feedback_timeout_s,
        )

    # --- connection ----------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine, created (with the tables) on first use."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._connect()
            return self._engine

    def _connect(self) -> Engine:
        try:
            url = make_url(self.url)
        except Exception as exc:
            raise FeedbackUnavailableError(f"invalid feedback database URL: {exc}") from None
        # Every wait is bounded by timeout_s: a locked or unreachable database fails a call
        # in seconds instead of holding its thread (the API's feedback bulkhead relies on it).
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                try:
                    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise FeedbackUnavailableError(
                        f"cannot use feedback database {_redacted(self.url)}: {exc.strerror or exc}"
                    ) from None
                kwargs["pool_timeout"] = self.timeout_s
            kwargs["connect_args"] = {"timeout": self.timeout_s, "check_same_thread": False}
        elif url.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {
                "connect_timeout": max(2, round(self.timeout_s)),
                "options": f"-c statement_timeout={round(self.timeout_s * 1000)} "
                f"-c lock_timeout={round(self.timeout_s * 1000)}",
            }
            kwargs["pool_timeout"] = self.timeout_s
        else:
            kwargs["connect_args"] = {"connect_timeout": max(2, round(self.timeout_s))}
        try:
            engine = create_engine(url, **kwargs)
        except Exception as exc:
            raise FeedbackUnavailableError(
                f"cannot use feedback database {_redacted(self.url)}: {exc}"
            ) from None
        if url.get_backend_name() == "sqlite":

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

        try:
            _Base.metadata.create_all(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise self._unavailable(exc) from None
        return engine

    def _unavailable(self, exc: Exception) -> FeedbackUnavailableError:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        return FeedbackUnavailableError(
            f"feedback database {_redacted(self.url)} is unavailable: {reason}"
        )

    def check(self) -> None:
        """Raise :class:`FeedbackUnavailableError` unless the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def close(self) -> None:
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    # --- predictions ---------------------------------------------------------------------
    def record_predictions(self, records: Iterable[PredictionRecord]) -> int:
        """Insert predictions (ids already present are skipped); returns how many were new."""
        rows = list(records)
        if not rows:
            return 0
        try:
            with Session(self.engine) as session, session.begin():
                ids = [r.prediction_id for r in rows]
                existing = set(
                    session.scalars(
                        select(_PredictionRow.prediction_id).where(
                            _PredictionRow.prediction_id.in_(ids)
                        )
                    )
                )
                new = [r for r in rows if r.prediction_id not in existing]
                session.add_all(
                    _PredictionRow(
                        prediction_id=r.prediction_id,
                        created_at=r.created_at or _now(),
                        label=r.label,
                        top_label=r.top_label,
                        confidence=float(r.confidence),
                        probabilities={k: float(v) for k, v in r.probabilities.items()},
                        model_name=r.model_name,
                        model_version=r.model_version,
                        image_sha256=r.image_sha256,
                        request_id=r.request_id,
                    )
                    for r in new
                )
            return len(new)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        try:
            with Session(self.engine) as session:
                row = session.get(_PredictionRow, prediction_id)
                if row is None:
                    return None
                return PredictionRecord(
                    prediction_id=row.prediction_id,
                    label=row.label,
                    top_label=row.top_label,
                    confidence=row.confidence,
                    probabilities=dict(row.probabilities),
                    model_name=row.model_name,
                    model_version=row.model_version,
                    image_sha256=row.image_sha256,
                    request_id=row.request_id,
                    created_at=_utc(row.created_at),
                )
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    # --- feedback ------------------------------------------------------------------------
    def add_feedback(
        self,
        prediction_id: str,
        correct_label: str,
        image: bytes | None = None,
        *,
        prediction: PredictionRecord | None = None,
    ) -> FeedbackRecord:
        """Record that ``correct_label`` is the right answer for a prediction.

        ``prediction`` may be passed when the caller already holds it (otherwise it is
        read from the ``predictions`` table). The optional image must be the bytes that
        were predicted (same sha256) when the prediction recorded one.
        """
        if correct_label not in self.feedback_labels:
            raise InvalidFeedbackError(
                f"correct_label must be one of {', '.join(self.feedback_labels)}, "
                f"not {correct_label!r}"
            )
        prediction = prediction or self.get_prediction(prediction_id)
        if prediction is None:
            raise UnknownPredictionError(f"no prediction with id {prediction_id!r} is recorded")
        if self._feedback_exists(prediction_id):
            raise DuplicateFeedbackError(
                f"feedback for prediction {prediction_id!r} is already recorded"
            )
        image_key = image_sha = None
        if image:
            image_key, image_sha = self._save_image(image, correct_label, prediction)
        row = _FeedbackRow(
            feedback_id=str(uuid.uuid4()),
            prediction_id=prediction_id,
            created_at=_now(),
            correct_label=correct_label,
            predicted_label=prediction.top_label,
            agree=agrees(correct_label, prediction),
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            image_key=image_key,
            image_sha256=image_sha,
        )
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise DuplicateFeedbackError(
                f"feedback for prediction {prediction_id!r} is already recorded"
            ) from None
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None
        return _record(row)

    def _feedback_exists(self, prediction_id: str) -> bool:
        try:
            with Session(self.engine) as session:
                return (
                    session.scalar(
                        select(_FeedbackRow.feedback_id).where(
                            _FeedbackRow.prediction_id == prediction_id
                        )
                    )
                    is not None
                )
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def _save_image(
        self, image: bytes, label: str, prediction: PredictionRecord
    ) -> tuple[str, str]:
        digest = sha256_hex(image)
        if prediction.image_sha256 and prediction.image_sha256 != digest:
            raise InvalidFeedbackError(
                "the image is not the one that was predicted (sha256 differs)"
            )
        if self.store is None:
            raise InvalidFeedbackError("this feedback store keeps no images")
        try:
            limits = ImageLimits(self.max_image_pixels) if self.max_image_pixels else None
            accepted = accept_image(image, limits)
        except InvalidImageError as exc:
            raise InvalidFeedbackError(f"the feedback image is unusable: {exc}") from None
        # Stored: the image only (nothing after its end); matched: the bytes as predicted.
        canonical = canonical_image(image, accepted)
        key = f"feedback/{label}/{sha256_hex(canonical.data)}.{canonical.ext}"
        self.store.put_bytes(key, canonical.data, content_type=f"image/{canonical.format.lower()}")
        return key, digest

    def get_feedback(self, feedback_id: str) -> FeedbackRecord | None:
        try:
            with Session(self.engine) as session:
                row = session.get(_FeedbackRow, feedback_id)
                return _record(row) if row is not None else None
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def list_feedback(
        self, *, reviewed: bool | None = None, limit: int | None = None
    ) -> list[FeedbackRecord]:
        """Feedback, newest first; ``reviewed`` filters on whether a reviewer decided."""
        query = select(_FeedbackRow).order_by(_FeedbackRow.created_at.desc())
        if reviewed is True:
            query = query.where(_FeedbackRow.reviewed_at.is_not(None))
        elif reviewed is False:
            query = query.where(_FeedbackRow.reviewed_at.is_(None))
        if limit is not None:
            query = query.limit(limit)
        try:
            with Session(self.engine) as session:
                return [_record(r) for r in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

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
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                rows: dict[str, _FeedbackRow] = {}
                for start in range(0, len(ids), 500):  # bounded IN lists
                    chunk = ids[start : start + 500]
                    query = select(_FeedbackRow).where(_FeedbackRow.feedback_id.in_(chunk))
                    rows.update((r.feedback_id, r) for r in session.scalars(query))
                missing = [i for i in ids if i not in rows]
                if missing:
                    shown = ", ".join(repr(i) for i in missing[:5])
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    plural = "s" if len(missing) > 1 else ""
                    raise FeedbackError(f"no feedback with id{plural} {shown}{more}")
                now = _now()
                for row in rows.values():
                    row.reviewed_at = now
                    row.accepted = accepted
            return [_record(rows[i]) for i in ids]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def review_queue(self, limit: int | None = 50) -> list[ReviewItem]:
        """Pending (not yet reviewed) feedback, most informative first.

        The order, key by key:

        1. disagreements first: the user's label is not what the model said
           (``agree`` is false, see :func:`agrees`);
        2. then answers the model was unsure of: ``uncertain`` or ``unknown`` before a
           class answer;
        3. then lowest confidence first (an item whose prediction was not recorded, so
           without a confidence, after those with one);
        4. then oldest feedback first, then by feedback id (a stable order).

        Each item carries its prediction's answer, confidence and probabilities.
        """
        unsure = case((_PredictionRow.label.in_((UNCERTAIN, UNKNOWN)), 0), else_=1)
        query = (
            select(
                _FeedbackRow,
                _PredictionRow.label,
                _PredictionRow.confidence,
                _PredictionRow.probabilities,
            )
            .outerjoin(_PredictionRow, _PredictionRow.prediction_id == _FeedbackRow.prediction_id)
            .where(_FeedbackRow.reviewed_at.is_(None))
            .order_by(
                case((_FeedbackRow.agree.is_(False), 0), else_=1),
                unsure,
                case((_PredictionRow.confidence.is_(None), 1), else_=0),
                _PredictionRow.confidence.asc(),
                _FeedbackRow.created_at.asc(),
                _FeedbackRow.feedback_id.asc(),
            )
        )
        if limit is not None:
            query = query.limit(limit)
        try:
            with Session(self.engine) as session:
                return [
                    ReviewItem(
                        feedback=_record(row),
                        answer=answer,
                        confidence=None if confidence is None else float(confidence),
                        probabilities=dict(probabilities or {}),
                    )
                    for row, answer, confidence, probabilities in session.execute(query)
                ]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def count_pending(self) -> int:
        """How many feedback items wait for a reviewer's decision."""
        query = (
            select(func.count()).select_from(_FeedbackRow).where(_FeedbackRow.reviewed_at.is_(None))
        )
        try:
            with Session(self.engine) as session:
                return int(session.scalar(query) or 0)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def awaiting_dataset(self) -> AwaitingDataset:
        """Accepted photos that the latest dataset version does not have yet.

        An accepted photo is in the latest version when its manifest lists it as
        ``feedback:<feedback id>``, or lists the same image (its sha256, which names the stored
        photo): identical bytes from another source collapse into one manifest row, and under
        another label the photo is a conflict that ingestion leaves out (the dataset's label
        stands, see :mod:`dandelion_lib.data.ingest`). So this is what the next ingestion will add.
        The manifest is read once per version.
        """
        records = self.accepted()
        version, sources, images = self._latest_dataset()
        shas = {sha for sha, _ in images}
        waiting = 0
        for r in records:
            sha = Path(r.image_key or "").stem
            if f"{FEEDBACK_SOURCE_PREFIX}{r.feedback_id}" not in sources and sha not in shas:
                waiting += 1
        return AwaitingDataset(count=waiting, accepted=len(records), version=version)

    def _latest_dataset(self) -> tuple[str | None, frozenset[str], frozenset[tuple[str, str]]]:
        """The latest dataset version, its feedback sources and its (sha256, label) pairs."""
        if self.store is None:
            return None, frozenset(), frozenset()
        from dandelion_lib.data import dataset  # pandas: only where the count is asked for

        try:
            version = dataset.latest_version(self.store)
        except dataset.DatasetNotFoundError:
            return None, frozenset(), frozenset()
        cached = self._dataset_cache
        if cached is None or cached[0] != version:
            df = dataset.load_manifest(self.store, version)
            sources = frozenset(
                s for s in df["source"].astype(str) if s.startswith(FEEDBACK_SOURCE_PREFIX)
            )
            images = frozenset(zip(df["sha256"].astype(str), df["label"].astype(str), strict=True))
            cached = (version, sources, images)
            self._dataset_cache = cached
        return cached

    def accepted(self) -> list[FeedbackRecord]:
        """Reviewed, accepted feedback that carries an image: input for ingestion."""
        query = (
            select(_FeedbackRow)
            .where(_FeedbackRow.accepted.is_(True), _FeedbackRow.image_key.is_not(None))
            .order_by(_FeedbackRow.created_at)
        )
        try:
            with Session(self.engine) as session:
                return [_record(r) for r in session.scalars(query)]
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def recent_accuracy(self, window: int = 200) -> tuple[float | None, int]:
        """Share of the last ``window`` feedback items where the model agreed, and the count."""
        query = select(_FeedbackRow.agree).order_by(_FeedbackRow.created_at.desc()).limit(window)
        try:
            with Session(self.engine) as session:
                values = list(session.scalars(query))
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None
        if not values:
            return None, 0
        return sum(bool(v) for v in values) / len(values), len(values)


def _record(row: _FeedbackRow) -> FeedbackRecord:
    return FeedbackRecord(
        feedback_id=row.feedback_id,
        prediction_id=row.prediction_id,
        correct_label=row.correct_label,
        predicted_label=row.predicted_label,
        agree=bool(row.agree),
        model_name=row.model_name,
        model_version=row.model_version,
        image_key=row.image_key,
        image_sha256=row.image_sha256,
        created_at=_utc(row.created_at) or _now(),
        reviewed_at=_utc(row.reviewed_at),
        accepted=row.accepted,
    )


# --- command line: `dandelion feedback` -----------------------------------------------------
def add_cli_arguments(parser: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON lines")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="feedback, newest first", parents=[common])
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--pending", action="store_true", help="only feedback not reviewed yet")
    state.add_argument("--reviewed", action="store_true", help="only reviewed feedback")
    listing.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    queue = sub.add_parser(
        "queue",
        help="pending feedback, most informative first (the reviewer page's order)",
        parents=[common],
    )
    queue.add_argument("--limit", type=int, default=50, help="at most N rows (default 50)")
    review = sub.add_parser(
        "review",
        help="accept or reject feedback for the next dataset (several ids: one transaction)",
        parents=[common],
    )
    review.add_argument("feedback_id", nargs="+")
    decision = review.add_mutually_exclusive_group(required=True)
    decision.add_argument("--accept", action="store_true")
    decision.add_argument("--reject", action="store_true")
    sub.add_parser(
        "accepted", help="accepted feedback with images (input for ingestion)", parents=[common]
    )


def cli(args: Any) -> int:
    store = FeedbackStore.from_settings()
    try:
        if args.action == "list":
            reviewed = True if args.reviewed else False if args.pending else None
            records = store.list_feedback(reviewed=reviewed, limit=args.limit)
        elif args.action == "queue":
            return _print_queue(store.review_queue(args.limit), as_json=args.json)
        elif args.action == "review":
            records = store.review_many(args.feedback_id, accepted=bool(args.accept))
        else:
            records = store.accepted()
    finally:
        store.close()
    for r in records:
        if args.json:
            print(json.dumps(r.to_dict()))
        else:
            decision = (
                "pending" if r.reviewed_at is None else ("accepted" if r.accepted else "rejected")
            )
            print(
                f"{r.feedback_id}  {r.created_at:%Y-%m-%d %H:%M}  {r.correct_label:<10} "
                f"model said {r.predicted_label:<10} v{r.model_version}  {decision:<8} "
                f"{r.image_key or '-'}"
            )
    return 0


def _print_queue(items: list[ReviewItem], *, as_json: bool) -> int:
    for item in items:
        r = item.feedback
        if as_json:
            row = {**r.to_dict(), "answer": item.answer, "confidence": item.confidence}
            print(json.dumps({**row, "reason": item.reason}))
        else:
            confidence = "-" if item.confidence is None else f"{item.confidence:.2f}"
            print(
                f"{r.feedback_id}  {item.reason:<12} {r.correct_label:<10} "
                f"model said {item.answer or '?':<10} {confidence:>5}  v{r.model_version}  "
                f"{r.image_key or '-'}"
            )
    return 0
