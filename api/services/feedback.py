"""Feedback: match a user's correct label to a served prediction and store it durably."""

from __future__ import annotations

import logging
import uuid

from api.bulkhead import Bulkhead, BulkheadError, BulkheadFull
from api.metrics import ApiMetrics
from api.problems import Problem
from api.schemas import FeedbackResponse, FeedbackSubmission, ModelRef
from api.services.recording import PredictionLog
from dandelion_lib.core.images import DecodeBudgetExceeded
from dandelion_lib.core.storage import StoreError
from dandelion_lib.data.feedback import (
    DuplicateFeedbackError,
    FeedbackRecord,
    FeedbackStore,
    FeedbackUnavailableError,
    InvalidFeedbackError,
    UnknownPredictionError,
)

log = logging.getLogger("api.feedback")


class FeedbackService:
    def __init__(
        self,
        store: FeedbackStore,
        predictions: PredictionLog,
        metrics: ApiMetrics,
        *,
        accuracy_window: int = 200,
        bulkhead: Bulkhead | None = None,
    ):
        self.store = store
        self.predictions = predictions
        self.metrics = metrics
        self.accuracy_window = accuracy_window
        self.bulkhead = bulkhead or Bulkhead("feedback", limit=4, deadline_s=store.timeout_s)

    async def submit(self, submission: FeedbackSubmission) -> FeedbackResponse:
        """Store feedback in the feedback bulkhead; raises :class:`Problem`.

        The database and the object store are reached only from the bulkhead's own threads:
        when they are slow or down, feedback answers 503 within the deadline and the
        threads that decode images for predictions are never taken.
        """
        try:
            record = await self.bulkhead.call(
                self._store, submission.prediction_id, submission.correct_label, submission.image
            )
        except BulkheadError as exc:
            raise self._unavailable(exc) from None
        return FeedbackResponse(
            feedback_id=record.feedback_id,
            prediction_id=record.prediction_id,
            correct_label=record.correct_label,
            predicted_label=record.predicted_label,
            agree=record.agree,
            model=ModelRef(name=record.model_name, version=record.model_version),
            image_key=record.image_key,
            created_at=record.created_at.isoformat(),
        )

    def _unavailable(self, exc: BulkheadError) -> Problem:
        if isinstance(exc, BulkheadFull):
            reason, code = "busy", "feedback-busy"
            detail = (
                f"feedback is not taken now: {exc.bulkhead.running} earlier feedback requests "
                "are still waiting on the feedback database or object store; nothing was stored"
            )
        else:
            reason, code = "timeout", "feedback-timeout"
            detail = (
                "the feedback database or object store did not answer within "
                f"{exc.bulkhead.deadline_s:g} s; the feedback may still be stored (sending it "
                "again answers 409 duplicate-feedback if it was)"
            )
        self.metrics.dependency_failures.labels(dependency="feedback", reason=reason).inc()
        log.error("feedback not stored: %s", exc.detail)
        return Problem(503, code, detail, headers={"Retry-After": "10"})

    def _store(self, prediction_id: str, correct_label: str, image: bytes | None) -> FeedbackRecord:
        try:
            uuid.UUID(prediction_id)
        except ValueError:
            raise Problem(
                422, "invalid-feedback", "prediction_id must be the id returned by /predict"
            ) from None
        try:
            prediction = self.predictions.get(prediction_id)
            if prediction is None:
                raise UnknownPredictionError(f"no prediction with id {prediction_id!r} is recorded")
            record = self.store.add_feedback(
                prediction_id, correct_label, image, prediction=prediction
            )
        except UnknownPredictionError as exc:
            raise Problem(404, "unknown-prediction", str(exc)) from None
        except DuplicateFeedbackError as exc:
            raise Problem(409, "duplicate-feedback", str(exc)) from None
        except InvalidFeedbackError as exc:
            raise Problem(422, "invalid-feedback", str(exc)) from None
        except DecodeBudgetExceeded as exc:
            raise Problem(
                503, "decode-busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from None
        except (FeedbackUnavailableError, StoreError) as exc:
            log.error("feedback not stored: %s", exc)
            raise Problem(
                503, "feedback-unavailable", str(exc), headers={"Retry-After": "10"}
            ) from None
        self.metrics.feedback.labels(agreement="agree" if record.agree else "disagree").inc()
        self.refresh_accuracy()
        log.info(
            "feedback",
            extra={
                "feedback_id": record.feedback_id,
                "prediction_id": record.prediction_id,
                "correct_label": record.correct_label,
                "agree": record.agree,
                "model_version": record.model_version,
                "image_key": record.image_key,
            },
        )
        return record

    def refresh_accuracy(self) -> None:
        """Set the live accuracy gauge from the latest feedback in the database."""
        try:
            accuracy, _count = self.store.recent_accuracy(self.accuracy_window)
        except FeedbackUnavailableError as exc:
            log.warning("live accuracy not updated: %s", exc)
            return
        if accuracy is not None:
            self.metrics.live_accuracy.set(accuracy)
