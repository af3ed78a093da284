"""Typed request data the handlers receive as dependencies: images and feedback.

``POST /predict`` takes a multipart field or a raw ``image/*`` body and ``POST /feedback``
takes JSON or multipart, which one Litestar ``data`` parameter (one media type) cannot
express; these providers read either form into one typed value (:class:`Upload`, a list of
them, :class:`~api.schemas.FeedbackSubmission`) or raise a :class:`Problem`.

Only the framing is checked here (content type, field names, counts, sizes); whether the
bytes are a usable image is decided when they are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile

from api.problems import Problem
from api.schemas import FeedbackRequest, FeedbackSubmission
from dandelion_lib.config import Settings

SINGLE_FIELD = "file"
BATCH_FIELD = "files"
RAW_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Upload:
    """One image as received (``error`` set when the item itself is unusable)."""

    data: bytes
    filename: str | None = None
    error: Problem | None = None


def _media_type(request: Request[Any, Any, Any]) -> str:
    media_type, _ = request.content_type
    return media_type.strip().lower()


async def _read_upload(value: object, field: str) -> Upload:
    if isinstance(value, UploadFile):
        try:
            return Upload(await value.read(), value.filename or None)
        finally:
            await value.close()
    return Upload(
        b"",
        None,
        Problem(400, "not-a-file", f"form field {field!r} must be a file upload, not text"),
    )


def _unsupported(media_type: str, *, raw_allowed: bool) -> Problem:
    expected = (
        f"multipart/form-data with the image in field {SINGLE_FIELD!r}, or a raw image/* body"
        if raw_allowed
        else f"multipart/form-data with the images in field {BATCH_FIELD!r}"
    )
    sent = media_type or "no Content-Type"
    return Problem(415, "unsupported-media-type", f"expected {expected}; got {sent}")


async def read_single_image(request: Request[Any, Any, Any]) -> Upload:
    """The one image of ``POST /predict``."""
    media_type = _media_type(request)
    if media_type == "multipart/form-data":
        form = await request.form()
        values = form.getall(SINGLE_FIELD) if SINGLE_FIELD in form else []
        if not values:
            fields = ", ".join(sorted(form.keys())) or "none"
            raise Problem(
                400,
                "missing-file",
                f"no image in form field {SINGLE_FIELD!r} (fields sent: {fields})",
            )
        if len(values) > 1:
            raise Problem(
                400,
                "too-many-files",
                f"/predict takes one image; send several to /predict/batch in field {BATCH_FIELD!r}",
            )
        upload = await _read_upload(values[0], SINGLE_FIELD)
        if upload.error:
            raise upload.error
        return upload
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        return Upload(await request.body())
    body = await request.body()
    if not body and not media_type:
        raise Problem(400, "empty-body", "the request has no body; send an image")
    raise _unsupported(media_type, raw_allowed=True)


async def read_batch_images(request: Request[Any, Any, Any], settings: Settings) -> list[Upload]:
    """The images of ``POST /predict/batch`` (in order)."""
    max_images = settings.max_batch_images
    media_type = _media_type(request)
    if media_type != "multipart/form-data":
        body = await request.body()
        if not body and not media_type:
            raise Problem(400, "empty-body", "the request has no body; send images")
        raise _unsupported(media_type, raw_allowed=False)
    form = await request.form()
    values = form.getall(BATCH_FIELD) if BATCH_FIELD in form else []
    if not values:
        fields = ", ".join(sorted(form.keys())) or "none"
        raise Problem(
            400, "missing-file", f"no images in form field {BATCH_FIELD!r} (fields sent: {fields})"
        )
    if len(values) > max_images:
        for value in values:
            if isinstance(value, UploadFile):
                await value.close()
        raise Problem(
            413,
            "too-many-files",
            f"{len(values)} images sent; the limit per batch is {max_images}",
        )
    return [await _read_upload(v, BATCH_FIELD) for v in values]


async def read_feedback(request: Request[Any, Any, Any]) -> FeedbackSubmission:
    """The body of ``POST /feedback``: JSON, or multipart with an optional ``image`` file."""
    media_type = _media_type(request)
    if media_type == "application/json":
        try:
            data = msgspec.json.decode(await request.body(), type=FeedbackRequest)
        except msgspec.ValidationError as exc:
            raise Problem(422, "invalid-feedback", f"invalid feedback: {exc}") from None
        except msgspec.DecodeError:
            raise Problem(400, "invalid-json", "the body is not valid JSON") from None
        return FeedbackSubmission(data.prediction_id, data.correct_label)
    if media_type == "multipart/form-data":
        return await _read_feedback_form(request)
    raise Problem(
        415,
        "unsupported-media-type",
        f"send application/json or multipart/form-data; got {media_type or 'no Content-Type'}",
    )


async def _read_feedback_form(request: Request[Any, Any, Any]) -> FeedbackSubmission:
    form = await request.form()
    fields: dict[str, str] = {}
    for name in ("prediction_id", "correct_label"):
        value = form.get(name)
        if not isinstance(value, str) or not value:
            raise Problem(422, "invalid-feedback", f"form field {name!r} is required")
        fields[name] = value
    image = form.get("image")
    data: bytes | None = None
    if isinstance(image, UploadFile):
        data = await image.read()
        await image.close()
        if not data:
            raise Problem(400, "empty-image", "the feedback image is empty (0 bytes)")
    elif image is not None:
        raise Problem(422, "invalid-feedback", "form field 'image' must be a file upload")
    return FeedbackSubmission(fields["prediction_id"], fields["correct_label"], data)
