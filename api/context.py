"""Per-request context shared by the middleware, services and log lines."""

from __future__ import annotations

import contextvars
import threading

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
"""The id of the request being served (``X-Request-ID``)."""

request_start_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "request_start", default=None
)
"""``time.perf_counter()`` when the request arrived."""

shutting_down = threading.Event()
"""Set when the server starts its graceful shutdown (:mod:`api.transport`): requests that
wait on a dependency (an admin reload) answer 503 at once instead of outliving the grace."""
