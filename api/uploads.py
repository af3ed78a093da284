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
from litestar.datastructures import FormMultiDict, UploadFile
from litestar.exceptions import ClientException

from api.problems import Problem
from api.schemas import FeedbackRequest, FeedbackSubmission
from dandelion_lib.core.config import Settings

SINGLE_FIELD = "file"
BATCH_FIELD = "files"
RAW_TYPES = ("application/octet-stream",)
MAX_FILENAME_CHARS = 255
"""Longest filename accepted on an upload (the common file-system limit); the batch answer
echoes filenames back."""


@dataclass(frozen=True)
class Upload:
    """One image as received (``error`` set when the item itself is unusable)."""

    data: bytes
    filename: str | None = None
    error: Problem | None = None


MAX_PART_HEADER_BYTES = 4096 + 128
"""The multipart parser's limit on one header line of a part (``multipart`` package default)."""


async def _form(request: Request[Any, Any, Any]) -> FormMultiDict:
    """The parsed multipart form. Litestar reports every parser limit as one "Request Entity
    Too Large"; the parser's own exception (its context, read here before anything else can
    replace it) says which limit, so the answer names it."""
    try:
        return await request.form()
    except ClientException as exc:
        reason = str(exc.__context__ or "") if exc.detail == "Request Entity Too Large" else ""
        if "header length" in reason:
            # The Content-Disposition line carries the filename; nothing else in it grows long.
            raise Problem(
                400,
                "filename-too-long",
                "filename too long: a part's header line (Content-Disposition, which carries "
                f"the filename) exceeds {MAX_PART_HEADER_BYTES:,} bytes; send a shorter filename",
            ) from None
        if "header count" in reason:
            raise Problem(
                400,
                "too-many-part-headers",
                "a multipart part has too many header lines (the limit is 8)",
            ) from None
        raise


def _media_type(request: Request[Any, Any, Any]) -> str:
    media_type, _ = request.content_type
    return media_type.strip().lower()


def _filename_too_long(filename: str) -> Problem:
    return Problem(
        400,
        "filename-too-long",
        f"filename too long: {len(filename):,} characters, the limit is {MAX_FILENAME_CHARS}",
    )


async def _read_upload(value: object, field: str) -> Upload:
    if isinstance(value, UploadFile):
        try:
            filename = value.filename or None
            if filename is not None and len(filename) > MAX_FILENAME_CHARS:
                return Upload(b"", None, _filename_too_long(filename))
            return Upload(await value.read(), filename)
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
        form = await _form(request)
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
    max_images = settings.serving.max_batch_images
    media_type = _media_type(request)
    if media_type != "multipart/form-data":
        body = await request.body()
        if not body and not media_type:
            raise Problem(400, "empty-body", "the request has no body; send images")
        raise _unsupported(media_type, raw_allowed=False)
    form = await _form(request)
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
    form = await _form(request)
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
