"""The request-context layer (``api/middleware.py``) around an app that fails before any
handler answers: the client still gets problem+json with its request id, and the request is
counted. The inner app is a plain ASGI function that raises, standing in for a failure
outside Litestar's handlers (which Litestar itself would turn into a response)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from api.metrics import ApiMetrics
from api.middleware import RequestContextMiddleware
from api.problems import TYPE_PREFIX


async def _fails(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("broken before any handler")


def _call(app: RequestContextMiddleware, headers: list[tuple[bytes, bytes]]) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers, "client": None}
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent


def test_a_failure_outside_the_handlers_is_a_counted_problem_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ApiMetrics()
    app = RequestContextMiddleware(_fails, metrics)
    with caplog.at_level(logging.INFO, logger="api.access"):
        start, body = _call(app, [(b"x-request-id", b"abc-123")])
    assert start["status"] == 500
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"x-request-id"] == b"abc-123"
    problem = json.loads(body["body"])
    assert problem["status"] == 500 and problem["code"] == "internal-error"
    assert problem["type"] == TYPE_PREFIX + "internal-error"
    assert "broken" not in body["body"].decode()
    count = metrics.registry.get_sample_value(
        "dandelion_http_requests_total", {"route": "unmatched", "method": "GET", "status": "500"}
    )
    assert count == 1
    access = [r for r in caplog.records if r.getMessage() == "request"]
    assert [(r.levelno, getattr(r, "status", None)) for r in access] == [(logging.INFO, 500)]


def test_an_unusable_request_id_is_replaced() -> None:
    app = RequestContextMiddleware(_fails, ApiMetrics())
    start, _ = _call(app, [(b"x-request-id", b"bad id\n")])
    request_id = dict(start["headers"])[b"x-request-id"]
    assert request_id != b"bad id\n" and len(request_id) == 32
