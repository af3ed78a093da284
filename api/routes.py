"""HTTP handlers: they only translate between HTTP and the services.

Typed inputs arrive as dependencies (:mod:`api.uploads` reads the bodies; the services come
from :mod:`api.dependencies`), admin routes are protected by a guard, and each handler
returns the typed structure its service produced.
"""

from __future__ import annotations

from typing import Any

from litestar import Response, get, post
from litestar.di import Provide
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_503_SERVICE_UNAVAILABLE

from api.dependencies import admin_guard
from api.metrics import CONTENT_TYPE_LATEST, ApiMetrics
from api.openapi import (
    BATCH_OPERATION,
    FEEDBACK_OPERATION,
    PREDICT_OPERATION,
    problems,
)
from api.problems import Problem
from api.schemas import (
    BatchResponse,
    FeedbackResponse,
    FeedbackSubmission,
    Liveness,
    ModelInfo,
    PredictResponse,
    Readiness,
    ReloadResponse,
)
from api.services.feedback import FeedbackService
from api.services.models import ModelManager
from api.services.predictions import PredictionService
from api.uploads import Upload, read_batch_images, read_feedback, read_single_image


def read_explain(
    flag: str | None = Parameter(
        query="explain",
        default=None,
        description="`true` adds `explanation`: where the model looked, for the top class "
        "(default `false`; 409 `explanation-unavailable` when the served version cannot).",
        schema_extra={"type": "boolean", "oneOf": None},
    ),
) -> bool:
    """The ``explain`` query flag: ``true``/``false`` (or ``1``/``0``), else a 400."""
    value = "false" if flag is None else flag.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    shown = flag if flag is not None and len(flag) <= 20 else "a long value"
    raise Problem(400, "invalid-parameter", f"explain must be true or false, not {shown!r}")


PURPOSES = ("answer", "review")


def read_purpose(
    value: str | None = Parameter(
        query="purpose",
        default=None,
        description="`answer` (default): a user's photo, counted as a prediction (metrics, "
        "drift, the prediction log that feedback refers to). `review`: a photo already "
        "answered, looked at again (the reviewer page's maps): answered the same way but "
        "counted only in `dandelion_review_predictions_total`.",
        schema_extra={"type": "string", "enum": list(PURPOSES), "oneOf": None},
    ),
) -> bool:
    """The ``purpose`` query value: whether the request is a review (else a 400)."""
    purpose = "answer" if value is None else value.strip().lower()
    if purpose in PURPOSES:
        return purpose == "review"
    shown = value if value is not None and len(value) <= 20 else "a long value"
    raise Problem(400, "invalid-parameter", f"purpose must be answer or review, not {shown!r}")


@post(
    "/predict",
    status_code=HTTP_200_OK,
    operation_class=PREDICT_OPERATION,
    responses=problems(400, 409, 413, 415, 422, 503),
    tags=["predict"],
    summary="Classify one image",
    dependencies={
        "upload": Provide(read_single_image),
        "explain": Provide(read_explain, sync_to_thread=False),
        "review": Provide(read_purpose, sync_to_thread=False),
    },
)
async def predict(
    upload: Upload, explain: bool, review: bool, predictions: PredictionService
) -> PredictResponse:
    return await predictions.predict_one(upload, explain=explain, review=review)


@post(
    "/predict/batch",
    status_code=HTTP_200_OK,
    operation_class=BATCH_OPERATION,
    responses=problems(400, 409, 413, 415, 503),
    tags=["predict"],
    summary="Classify several images (per-item errors)",
    dependencies={
        "uploads": Provide(read_batch_images),
        "explain": Provide(read_explain, sync_to_thread=False),
        "review": Provide(read_purpose, sync_to_thread=False),
    },
)
async def predict_batch(
    uploads: list[Upload], explain: bool, review: bool, predictions: PredictionService
) -> BatchResponse:
    return await predictions.predict_batch(uploads, explain=explain, review=review)


@get("/health/live", tags=["health"], summary="The process is up")
async def live() -> Liveness:
    return Liveness(status="alive")


@get(
    "/health/ready",
    tags=["health"],
    summary="A model is loaded and warm (503 with the reason otherwise)",
    responses={503: problems(503)[503]},
)
async def ready(models: ModelManager) -> Response[Readiness]:
    readiness = models.readiness()
    if readiness.status == "ready":
        return Response(readiness)
    return Response(
        readiness, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": "5"}
    )


@get("/model", tags=["model"], summary="The model being served")
async def model_info(models: ModelManager) -> ModelInfo:
    return models.describe()


@get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    media_type=CONTENT_TYPE_LATEST,
    include_in_schema=True,
)
async def metrics(metrics: ApiMetrics, models: ModelManager) -> Response[bytes]:
    return Response(metrics.scrape(models.drift), media_type=CONTENT_TYPE_LATEST)


@post(
    "/feedback",
    status_code=HTTP_201_CREATED,
    operation_class=FEEDBACK_OPERATION,
    responses=problems(400, 404, 409, 413, 415, 422, 503),
    tags=["feedback"],
    summary="Report the correct label of a prediction",
    dependencies={"submission": Provide(read_feedback)},
)
async def feedback(submission: FeedbackSubmission, feedback: FeedbackService) -> FeedbackResponse:
    return await feedback.submit(submission)


@post(
    "/admin/reload",
    status_code=HTTP_200_OK,
    tags=["admin"],
    summary="Check the registry now and load the aliased version (bearer token)",
    responses=problems(401, 403, 503),
    security=[{"bearer": []}],
    guards=[admin_guard],
)
async def admin_reload(models: ModelManager) -> ReloadResponse:
    return await models.reload()


ROUTES: list[Any] = [
    predict,
    predict_batch,
    live,
    ready,
    model_info,
    metrics,
    feedback,
    admin_reload,
]
