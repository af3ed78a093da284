"""Predictions: decode untrusted bytes off the event loop, batch through the model, record.

Decoding runs in worker threads through :meth:`Predictor.decode`, which accepts images by the
one rule of :mod:`dandelion_lib.core.images` (formats, size limits, reject reasons with their HTTP
status and problem code). Any decoder failure is the input's fault and becomes a 4xx problem,
never a 500. The answer (a label, ``uncertain`` or ``unknown``, with its reason) is the
Predictor's answer policy's.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass

import anyio.to_thread
import msgspec
import numpy as np

from api.context import request_id_var, request_start_var
from api.metrics import ApiMetrics
from api.problems import Problem
from api.schemas import BatchItem, BatchResponse, Explanation, ModelRef, PredictResponse
from api.services.inference import InferenceQueue, QueueFullError
from api.services.models import ModelManager, ServingModel
from api.services.recording import PredictionLog
from api.uploads import Upload
from dandelion_lib.core.images import (
    DecodeBudget,
    DecodeBudgetExceeded,
    InvalidImageError,
    RejectReason,
)
from dandelion_lib.data.feedback import PredictionRecord
from dandelion_lib.serving.predict import Prediction, Predictor

log = logging.getLogger("api.predict")


@dataclass(frozen=True)
class Decoded:
    array: np.ndarray
    stats: dict[str, float]
    sha256: str


def image_problem(exc: InvalidImageError) -> Problem:
    """The problem answer for a refused image: status and code come with its reason."""
    reason = exc.reason
    return Problem(reason.status, reason.problem, str(exc), reason=reason.value)


def decode(predictor: Predictor, data: bytes, budget: DecodeBudget | None = None) -> Decoded:
    """Bytes -> model input + statistics, or :class:`Problem` (runs in a worker thread)."""
    try:
        array, stats = predictor.decode(data, budget)
    except InvalidImageError as exc:
        raise image_problem(exc) from None
    except DecodeBudgetExceeded as exc:
        raise Problem(
            503, "decode-busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    except Exception as exc:  # preprocessing an accepted image failed: still the input's fault
        text = str(exc).strip().splitlines()
        detail = f"the image cannot be decoded ({text[0][:200] if text else type(exc).__name__})"
        log.warning("decoder error", extra={"error": detail})
        raise image_problem(InvalidImageError(RejectReason.TRUNCATED, detail)) from None
    return Decoded(array, stats, hashlib.sha256(data).hexdigest())


class PredictionService:
    """Everything between received bytes and a prediction answer."""

    def __init__(
        self,
        *,
        models: ModelManager,
        queue: InferenceQueue,
        metrics: ApiMetrics,
        recorder: PredictionLog | None,
        budget: DecodeBudget | None = None,
    ):
        self.models = models
        self.budget = budget
        self.queue = queue
        self.metrics = metrics
        self.recorder = recorder

    def serving(self, explain: bool = False) -> ServingModel:
        """The model to answer with; with ``explain``, one that can explain (else a 409)."""
        model = self.models.current
        if model is None:
            raise Problem(
                503,
                "model-unavailable",
                f"no model is loaded yet ({self.models.reason})",
                headers={"Retry-After": "5"},
            )
        reason = model.predictor.explain_unavailable
        if explain and reason is not None:
            raise Problem(409, "explanation-unavailable", f"{reason}; ask without explain")
        return model

    def _queue_full(self, exc: QueueFullError) -> Problem:
        return Problem(
            503,
            "queue-full",
            str(exc),
            headers={"Retry-After": str(exc.retry_after)},
        )

    async def predict_one(
        self, upload: Upload, *, explain: bool = False, review: bool = False
    ) -> PredictResponse:
        model = self.serving(explain)
        try:
            with self.queue.admit(1) as ticket:
                try:
                    decoded = await anyio.to_thread.run_sync(
                        decode, model.predictor, upload.data, self.budget
                    )
                except Problem as problem:
                    self.queue.discard(ticket)
                    raise problem from None
                (pred,) = await self.queue.predict(
                    ticket, [decoded.array], model.predictor, explain=explain
                )
        except QueueFullError as exc:
            raise self._queue_full(exc) from None
        return self._answer(model, pred, decoded, review)

    async def predict_batch(
        self, uploads: list[Upload], *, explain: bool = False, review: bool = False
    ) -> BatchResponse:
        """Per-item results in order: a ``prediction`` or an ``error`` (a problem) each
        (``review``: see :meth:`_answer`)."""
        model = self.serving(explain)
        items = [BatchItem(index=i, filename=u.filename) for i, u in enumerate(uploads)]
        try:
            with self.queue.admit(len(uploads)) as ticket:
                decoded = await anyio.to_thread.run_sync(self._decode_all, model, uploads)
                good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, Decoded)]
                self.queue.discard(ticket, len(uploads) - len(good))
                preds = await self.queue.predict(
                    ticket, [d.array for _, d in good], model.predictor, explain=explain
                )
        except QueueFullError as exc:
            raise self._queue_full(exc) from None
        for i, item in enumerate(decoded):
            if isinstance(item, Problem):
                self.metrics.count_invalid(item.code)
                items[i].error = item.detail_struct()
        for (i, image), pred in zip(good, preds, strict=True):
            items[i].prediction = self._answer(model, pred, image, review)
        failed = sum(item.error is not None for item in items)
        return BatchResponse(results=items, succeeded=len(items) - failed, failed=failed)

    def _decode_all(self, model: ServingModel, uploads: list[Upload]) -> list[Decoded | Problem]:
        out: list[Decoded | Problem] = []
        for upload in uploads:
            if upload.error is not None:
                out.append(upload.error)
                continue
            try:
                out.append(decode(model.predictor, upload.data, self.budget))
            except Problem as problem:
                out.append(problem)
        return out

    def _answer(
        self, model: ServingModel, pred: Prediction, decoded: Decoded, review: bool = False
    ) -> PredictResponse:
        """The response to one answered image, counted as a prediction (metrics, drift, the
        prediction log); with ``review`` (a reviewer looking again at a photo already
        answered) counted only as a review, so monitoring sees users' photos alone."""
        prediction_id = str(uuid.uuid4())
        predictor = model.predictor
        answer = predictor.decide(pred)
        label = answer.label
        started = request_start_var.get()
        latency_ms = (time.perf_counter() - started) * 1000.0 if started else 0.0
        if review:
            self.metrics.review_predictions.inc()
        else:
            self._count(model, pred, decoded, label, prediction_id)
        log.info(
            "prediction",
            extra={
                "prediction_id": prediction_id,
                "label": label,
                "confidence": round(pred.confidence, 4),
                "ood_score": None if pred.ood_score is None else round(pred.ood_score, 4),
                "model_name": predictor.name,
                "model_version": predictor.version,
                "purpose": "review" if review else "answer",
            },
        )
        return PredictResponse(
            prediction_id=prediction_id,
            label=label,
            probabilities=pred.probabilities,
            confidence=pred.confidence,
            model=ModelRef(name=predictor.name, version=predictor.version),
            latency_ms=round(latency_ms, 3),
            reason=answer.reason,
            ood_score=pred.ood_score,
            explanation=_explanation(pred),
        )

    def _count(
        self,
        model: ServingModel,
        pred: Prediction,
        decoded: Decoded,
        label: str,
        prediction_id: str,
    ) -> None:
        """A user's prediction into drift, the metrics and the prediction log."""
        predictor = model.predictor
        model.drift.add(decoded.stats)
        self.metrics.predictions.labels(label=label).inc()
        self.metrics.confidence.observe(pred.confidence)
        if self.recorder is not None:
            self.recorder.add(
                PredictionRecord(
                    prediction_id=prediction_id,
                    label=label,
                    top_label=pred.label,
                    confidence=pred.confidence,
                    probabilities=pred.probabilities,
                    model_name=predictor.name,
                    model_version=predictor.version,
                    image_sha256=decoded.sha256,
                    request_id=request_id_var.get(),
                )
            )


def _explanation(pred: Prediction) -> Explanation | msgspec.UnsetType:
    """The answer's ``explanation`` (left out of the body unless one was computed)."""
    if pred.explanation is None:
        return msgspec.UNSET
    body = pred.explanation.to_dict()
    return Explanation(class_=body["class"], shape=body["shape"], grid=body["grid"])
