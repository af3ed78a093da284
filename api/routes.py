"""HTTP handlers: parse, call a service, shape the answer. No logic of their own."""

from __future__ import annotations

import hmac
from typing import Any

import anyio.to_thread
import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

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
    FeedbackRequest,
    FeedbackResponse,
    Liveness,
    ModelInfo,
    ModelRef,
    PredictResponse,
    Readiness,
    ReloadResponse,
)
from api.services.feedback import FeedbackService
from api.services.models import ModelManager
from api.services.predictions import PredictionService
from api.uploads import read_batch_images, read_single_image
from dandelion_lib.config import Settings


@post(
    "/predict",
    status_code=HTTP_200_OK,
    operation_class=PREDICT_OPERATION,
    responses=problems(400, 413, 415, 422, 503),
    tags=["predict"],
    summary="Classify one image",
)
async def predict(request: Request, predictions: PredictionService) -> PredictResponse:
    upload = await read_single_image(request)
    return msgspec.convert(await predictions.predict_one(upload), PredictResponse)


@post(
    "/predict/batch",
    status_code=HTTP_200_OK,
    operation_class=BATCH_OPERATION,
    responses=problems(400, 413, 415, 503),
    tags=["predict"],
    summary="Classify several images (per-item errors)",
)
async def predict_batch(
    request: Request, predictions: PredictionService, settings: Settings
) -> BatchResponse:
    uploads = await read_batch_images(request, settings.max_batch_images)
    results = await predictions.predict_batch(uploads)
    failed = sum("error" in r for r in results)
    return msgspec.convert(
        {"results": results, "succeeded": len(results) - failed, "failed": failed}, BatchResponse
    )


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
    current = models.current
    if current is None:
        return Response(
            Readiness(status="not_ready", reason=models.reason or models.state),
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return Response(
        Readiness(
            status="ready",
            model=ModelRef(name=current.name, version=current.version),
        )
    )


@get("/model", tags=["model"], summary="The model being served")
async def model_info(models: ModelManager) -> ModelInfo:
    return msgspec.convert(models.describe(), ModelInfo)


@get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    media_type=CONTENT_TYPE_LATEST,
    include_in_schema=True,
)
async def metrics(metrics: ApiMetrics, models: ModelManager) -> Response[bytes]:
    current = models.current
    metrics.update_drift(current.drift if current else None)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@post(
    "/feedback",
    status_code=HTTP_201_CREATED,
    operation_class=FEEDBACK_OPERATION,
    responses=problems(400, 404, 409, 413, 415, 422, 503),
    tags=["feedback"],
    summary="Report the correct label of a prediction",
)
async def feedback(request: Request, feedback: FeedbackService) -> FeedbackResponse:
    prediction_id, correct_label, image = await _read_feedback(request)
    record = await anyio.to_thread.run_sync(feedback.submit, prediction_id, correct_label, image)
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


async def _read_feedback(request: Request) -> tuple[str, str, bytes | None]:
    media_type = request.content_type[0].lower()
    if media_type == "application/json":
        try:
            data = msgspec.json.decode(await request.body(), type=FeedbackRequest)
        except msgspec.ValidationError as exc:
            raise Problem(422, "invalid-feedback", f"invalid feedback: {exc}") from None
        except msgspec.DecodeError:
            raise Problem(400, "invalid-json", "the body is not valid JSON") from None
        return data.prediction_id, data.correct_label, None
    if media_type == "multipart/form-data":
        form = await request.form()
        fields: dict[str, str] = {}
        for name in ("prediction_id", "correct_label"):
            value = form.get(name)
            if not isinstance(value, str) or not value:
                raise Problem(422, "invalid-feedback", f"form field {name!r} is required")
            fields[name] = value
        image = form.get("image")
        data_bytes: bytes | None = None
        if isinstance(image, UploadFile):
            data_bytes = await image.read()
            await image.close()
            if not data_bytes:
                raise Problem(400, "empty-image", "the feedback image is empty (0 bytes)")
        elif image is not None:
            raise Problem(422, "invalid-feedback", "form field 'image' must be a file upload")
        return fields["prediction_id"], fields["correct_label"], data_bytes
    raise Problem(
        415,
        "unsupported-media-type",
        f"send application/json or multipart/form-data; got {media_type or 'no Content-Type'}",
    )


@post(
    "/admin/reload",
    status_code=HTTP_200_OK,
    tags=["admin"],
    summary="Check the registry now and load the aliased version (bearer token)",
    responses=problems(401, 403),
    security=[{"bearer": []}],
)
async def admin_reload(
    request: Request, models: ModelManager, settings: Settings
) -> ReloadResponse:
    _authorize(request, settings)
    result = await anyio.to_thread.run_sync(models.check, True)
    return ReloadResponse(
        action=result.action,
        version=result.version,
        detail=result.detail,
        model=msgspec.convert(models.describe(), ModelInfo),
    )


def _authorize(request: Request, settings: Settings) -> None:
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise Problem(
            403, "admin-disabled", "admin endpoints are disabled: DANDELION_ADMIN_TOKEN is not set"
        )
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = settings.admin_token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise Problem(
            401,
            "unauthorized",
            "a valid bearer token is required",
            headers={"WWW-Authenticate": 'Bearer realm="dandelion-admin"'},
        )


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
