"""User feedback on predictions, stored durably for live accuracy and the next dataset.

Two tables, created on first use with SQLAlchemy (SQLite by default, PostgreSQL in production):

* ``predictions`` — one row per served prediction (label, probabilities, model version,
  sha256 of the image bytes), written by the API so feedback can be matched to what the
  model answered, on any replica;
* ``feedback`` — at most one row per prediction: the label the user says is correct,
  whether the model agreed, the store key of the image when the user sent it, and the
  reviewer's decision.

Feedback images go to the object store as ``feedback/<correct_label>/<sha256>.<ext>``
before the row that references them is committed, so a row never points at a missing
object. What is stored is the image only (:func:`~dandelion_lib.core.images.canonical_image`:
nothing after the image's end), named by the sha256 of the stored bytes; the row's
``image_sha256`` stays the sha256 of the bytes as sent, which matched the prediction.

A reviewer accepts or rejects feedback through :class:`dandelion_lib.data.review.ReviewQueue`;
ingestion reads :meth:`FeedbackStore.accepted` to add reviewed images to the next dataset
version.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, String, create_engine, event, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dandelion_lib.core import images as acceptance
from dandelion_lib.core.config import Settings
from dandelion_lib.core.errors import DandelionError
from dandelion_lib.core.images import ImageLimits, InvalidImageError, accept_image, canonical_image
from dandelion_lib.core.labels import DEFAULT_LABELS, NEITHER, UNKNOWN
from dandelion_lib.core.storage import ObjectStore, open_store, sha256_hex

TRAINING_LABELS: tuple[str, ...] = DEFAULT_LABELS
"""The training labels feedback may carry (``uncertain`` and ``unknown`` are answers, never
training labels); besides them, feedback may say :data:`NEITHER`."""

FEEDBACK_SOURCE_PREFIX = "feedback:"
"""A dataset manifest's ``source`` of an accepted feedback photo: ``feedback:<feedback id>``
(written by :class:`dandelion_lib.data.sources.FeedbackSource`)."""


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


class PredictionRow(_Base):
    """The ``predictions`` table."""

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


class FeedbackRow(_Base):
    """The ``feedback`` table."""

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

    @classmethod
    def from_row(cls, row: FeedbackRow) -> FeedbackRecord:
        return cls(
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

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("created_at", "reviewed_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


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


def _engine_options(url: URL, timeout_s: float) -> dict[str, Any]:
    """Engine arguments that bound every wait by ``timeout_s``: a locked or unreachable
    database fails a call in seconds instead of holding its thread (the API's feedback
    bulkhead relies on it)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            kwargs["pool_timeout"] = timeout_s
        kwargs["connect_args"] = {"timeout": timeout_s, "check_same_thread": False}
    elif backend == "postgresql":
        kwargs["connect_args"] = {
            "connect_timeout": max(2, round(timeout_s)),
            "options": f"-c statement_timeout={round(timeout_s * 1000)} "
            f"-c lock_timeout={round(timeout_s * 1000)}",
        }
        kwargs["pool_timeout"] = timeout_s
    else:
        kwargs["connect_args"] = {"connect_timeout": max(2, round(timeout_s))}
    return kwargs


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


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
        self.decode_budget: acceptance.DecodeBudget | None = None  # the API's, if set
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @property
    def feedback_labels(self) -> tuple[str, ...]:
        """What a user may answer: a training label, or ``neither`` (neither class)."""
        return (*self.labels, NEITHER)

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackStore:
        return cls(
            settings.resolved_feedback_db_url,
            store=open_store(settings=settings),
            labels=settings.labels,
            max_image_pixels=settings.images.max_image_pixels,
            timeout_s=settings.feedback.feedback_timeout_s,
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
        sqlite = url.get_backend_name() == "sqlite"
        if sqlite and url.database and url.database != ":memory:":
            try:
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FeedbackUnavailableError(
                    f"cannot use feedback database {_redacted(self.url)}: {exc.strerror or exc}"
                ) from None
        try:
            engine = create_engine(url, **_engine_options(url, self.timeout_s))
        except Exception as exc:
            raise FeedbackUnavailableError(
                f"cannot use feedback database {_redacted(self.url)}: {exc}"
            ) from None
        if sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
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

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session on the database (one transaction, committed at the end, with ``write``);
        a database error becomes :class:`FeedbackUnavailableError`."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                if write:
                    with session.begin():
                        yield session
                else:
                    yield session
        except SQLAlchemyError as exc:
            raise self._unavailable(exc) from None

    def check(self) -> None:
        """Raise :class:`FeedbackUnavailableError` unless the database answers."""
        with self.session() as session:
            session.execute(text("SELECT 1"))

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
        with self.session(write=True) as session:
            ids = [r.prediction_id for r in rows]
            known = select(PredictionRow.prediction_id).where(PredictionRow.prediction_id.in_(ids))
            existing = set(session.scalars(known))
            new = [r for r in rows if r.prediction_id not in existing]
            session.add_all(
                PredictionRow(
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

    def get_prediction(self, prediction_id: str) -> PredictionRecord | None:
        with self.session() as session:
            row = session.get(PredictionRow, prediction_id)
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
        row = FeedbackRow(
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
        return FeedbackRecord.from_row(row)

    def _feedback_exists(self, prediction_id: str) -> bool:
        query = select(FeedbackRow.feedback_id).where(FeedbackRow.prediction_id == prediction_id)
        with self.session() as session:
            return session.scalar(query) is not None

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
            accepted = accept_image(image, limits, self.decode_budget)
        except InvalidImageError as exc:
            raise InvalidFeedbackError(f"the feedback image is unusable: {exc}") from None
        # Stored: the image only (no trailer, no metadata); matched: the bytes as predicted.
        canonical = canonical_image(image, accepted, strip_metadata=True, budget=self.decode_budget)
        key = f"feedback/{label}/{sha256_hex(canonical.data)}.{canonical.ext}"
        self.store.put_bytes(key, canonical.data, content_type=f"image/{canonical.format.lower()}")
        return key, digest

    def get_feedback(self, feedback_id: str) -> FeedbackRecord | None:
        with self.session() as session:
            row = session.get(FeedbackRow, feedback_id)
            return FeedbackRecord.from_row(row) if row is not None else None

    def list_feedback(
        self, *, reviewed: bool | None = None, limit: int | None = None
    ) -> list[FeedbackRecord]:
        """Feedback, newest first; ``reviewed`` filters on whether a reviewer decided."""
        query = select(FeedbackRow).order_by(FeedbackRow.created_at.desc())
        if reviewed is True:
            query = query.where(FeedbackRow.reviewed_at.is_not(None))
        elif reviewed is False:
            query = query.where(FeedbackRow.reviewed_at.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with self.session() as session:
            return [FeedbackRecord.from_row(r) for r in session.scalars(query)]

    def accepted(self) -> list[FeedbackRecord]:
        """Reviewed, accepted feedback that carries an image: input for ingestion."""
        query = (
            select(FeedbackRow)
            .where(FeedbackRow.accepted.is_(True), FeedbackRow.image_key.is_not(None))
            .order_by(FeedbackRow.created_at)
        )
        with self.session() as session:
            return [FeedbackRecord.from_row(r) for r in session.scalars(query)]

    def recent_accuracy(self, window: int = 200) -> tuple[float | None, int]:
        """Share of the last ``window`` feedback items where the model agreed, and the count."""
        query = select(FeedbackRow.agree).order_by(FeedbackRow.created_at.desc()).limit(window)
        with self.session() as session:
            values = list(session.scalars(query))
        if not values:
            return None, 0
        return sum(bool(v) for v in values) / len(values), len(values)
