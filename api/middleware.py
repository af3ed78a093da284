"""Outermost ASGI layer: request id, access log and HTTP metrics for every request.

It wraps the whole Litestar handler stack, so requests that match no route (404, 405)
are counted and logged too. Metrics use the route *template* (``/predict``), never the raw
path, to keep label cardinality bounded.
"""

from __future__ import annotations

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
        incoming = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        request_id = (
            incoming.decode() if incoming and _VALID_ID.match(incoming) else uuid.uuid4().hex
        )
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
                start_event: HTTPResponseStartEvent = {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/problem+json")],
                }
                await send_wrapper(start_event)
                body_event: HTTPResponseBodyEvent = {
                    "type": "http.response.body",
                    "body": _PROBLEM_500,
                    "more_body": False,
                }
                await send(body_event)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "")
            status = state["status"]
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
            request_id_var.reset(id_token)
            request_start_var.reset(start_token)
