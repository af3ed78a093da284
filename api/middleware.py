"""Outermost ASGI layers: request id, access log and HTTP metrics for every request, and
the deadline of request bodies.

:class:`RequestContextMiddleware` wraps the whole Litestar handler stack, so requests that
match no route (404, 405) are counted and logged too. Metrics use the route *template*
(``/predict``), never the raw path, to keep label cardinality bounded.
:class:`BodyDeadlineMiddleware` (inside it) bounds how slowly a body may arrive.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)

from api.context import request_id_var, request_start_var
from api.metrics import ApiMetrics
from api.problems import Problem

log = logging.getLogger("api.access")

REQUEST_ID_HEADER = b"x-request-id"
QUIET_ROUTES = frozenset({"/health/live", "/health/ready", "/metrics"})
"""Probe and scrape routes: logged at DEBUG unless they fail."""
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_PROBLEM_500 = (
    b'{"type":"urn:dandelion:problem:internal-error","title":"Internal Server Error",'
    b'"status":500,"detail":"internal server error","code":"internal-error"}'
)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        start = time.perf_counter()
        id_token = request_id_var.set(request_id)
        start_token = request_start_var.set(start)
        state: dict[str, Any] = {"status": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("request failed outside the handlers")
            if not state["started"]:
                await _send_problem_500(send_wrapper)
        finally:
            self._record(scope, state["status"], time.perf_counter() - start)
            request_id_var.reset(id_token)
            request_start_var.reset(start_token)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        """Count, time and log one finished request (probes and scrapes at DEBUG)."""
        route = scope.get("path_template") or "unmatched"
        method = scope.get("method", "")
        self.metrics.http_requests.labels(route=route, method=method, status=str(status)).inc()
        self.metrics.http_duration.labels(route=route, method=method).observe(elapsed)
        quiet = route in QUIET_ROUTES and status < 400
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "request",
            extra={
                "method": method,
                "path": scope.get("path"),
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000.0, 3),
                "client": (scope.get("client") or ("", 0))[0],
            },
        )


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, otherwise a new one."""
    incoming = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
    return incoming.decode() if incoming and _VALID_ID.match(incoming) else uuid.uuid4().hex


async def _send_problem_500(send: Send) -> None:
    """A problem+json 500 for an exception no handler answered, before any response started
    (``send`` is the request's wrapper, so the answer carries the request id)."""
    start_event: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 500,
        "headers": [(b"content-type", b"application/problem+json")],
    }
    await send(start_event)
    body_event: HTTPResponseBodyEvent = {
        "type": "http.response.body",
        "body": _PROBLEM_500,
        "more_body": False,
    }
    await send(body_event)


class BodyDeadlineMiddleware:
    """Request bodies must keep arriving (uvicorn has no body read timeout), on every route.

    From the handler's first read, the body may take ``grace_s`` seconds plus one second per
    ``min_rate`` bytes received: the next part must arrive before
    ``first read + grace_s + received / min_rate``. A client that stalls or trickles (a
    slowloris upload, a ``Content-Length`` larger than the body) gets 408
    ``body-timeout`` and the connection is closed. Reads after the body is complete (waiting
    for a disconnect) are not limited.

    A response sent before the request's body was read to its end (a 404, a route that
    ignores bodies, an error mid-body) says ``Connection: close``, and the server closes the
    connection once it is sent: the rest of the body is never waited for, so a body trickled
    to such a route cannot hold the connection.
    """

    def __init__(self, app: ASGIApp, grace_s: float, min_rate: float):
        self.app = app
        self.grace_s = grace_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        first: float | None = None
        received = 0
        complete = False

        async def timed_receive() -> Any:
            nonlocal first, received, complete
            if complete:
                return await receive()
            now = loop.time()
            first = now if first is None else first
            allowance = received / self.min_rate if self.min_rate > 0 else float("inf")
            try:
                async with asyncio.timeout(max(0.0, first + self.grace_s + allowance - now)):
                    message = await receive()
            except TimeoutError:
                raise Problem(
                    408,
                    "body-timeout",
                    f"the request body arrived too slowly ({received:,} bytes in "
                    f"{loop.time() - first:.0f} s; allowed: {self.grace_s:g} s plus 1 s per "
                    f"{self.min_rate:,.0f} bytes)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete and _has_body(scope):
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero ``Content-Length``, or chunked)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            return value.strip() not in (b"0", b"")
        if key == b"transfer-encoding":
            return True
    return False
