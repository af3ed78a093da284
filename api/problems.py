"""RFC 9457 problem details: every error leaves the API as ``application/problem+json``.

Handlers raise :class:`Problem` (or a library error mapped by :func:`from_error`); the
exception handlers installed by the app turn those, Litestar's own HTTP errors and any
unexpected exception into a problem response. Unexpected exceptions become a generic 500
whose body names only the request id; the stack trace goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from api.context import request_id_var
from api.schemas import ProblemDetail

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:dandelion:problem:"

log = logging.getLogger("api.errors")


class Problem(Exception):
    """An error answer: ``code`` becomes the problem type ``urn:dandelion:problem:<code>``."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"{TYPE_PREFIX}{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        request_id = request_id_var.get()
        if request_id:
            body["request_id"] = request_id
        body.update(self.extra)
        return body

    def detail_struct(self, instance: str | None = None) -> ProblemDetail:
        """The body as a typed structure (a batch item's ``error``)."""
        return msgspec.convert(self.body(instance), ProblemDetail)


def problem_response(
    problem: Problem, request: Request[Any, Any, Any] | None = None
) -> Response[Any]:
    instance = request.url.path if request is not None else None
    return Response(
        content=problem.body(instance),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
    429: "too-many-requests",
    503: "unavailable",
}


def from_exception(exc: Exception, *, max_body_bytes: int | None = None) -> Problem:
    """The problem to answer for any exception (logging unexpected ones with their trace)."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, HTTPException):
        problem = _from_http_exception(exc, max_body_bytes)
        if problem.status >= 500:
            log.error("unhandled HTTP error: %s", exc, exc_info=exc)
        return problem
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return Problem(500, "internal-error", "internal server error")


def _from_http_exception(exc: HTTPException, max_body_bytes: int | None) -> Problem:
    status = exc.status_code
    detail = str(exc.detail or HTTPStatus(status).phrase)
    extra: dict[str, Any] = {}
    if status == 500 and "client disconnected" in detail:
        # The client went away mid-body: not a server fault.
        return Problem(400, "client-disconnected", "the client closed the request early")
    if status == 400 and detail == "Request Entity Too Large":
        return Problem(413, "too-many-parts", "the multipart body has too many parts")
    if status == 413:
        limit = f" of {max_body_bytes:,} bytes" if max_body_bytes else ""
        return Problem(413, "body-too-large", f"the request body exceeds the limit{limit}")
    if status >= 500:
        return Problem(status, "internal-error", "internal server error")
    if isinstance(exc.extra, list) and exc.extra:
        extra["errors"] = [_clean(e) for e in exc.extra]
    elif isinstance(exc.extra, dict) and exc.extra:
        extra["errors"] = [_clean(exc.extra)]
    code = _HTTP_CODES.get(status, "http-error")
    return Problem(status, code, detail, headers=dict(exc.headers or {}), **extra)


def _clean(item: Any) -> Any:
    """Validation error items, without echoing the submitted values back."""
    if isinstance(item, dict):
        return {k: str(v)[:200] for k, v in item.items() if k != "value"}
    return str(item)[:200]
