"""Structured JSON logs: one object per line, with the request id of the current request.

Call sites add fields with ``extra=``; e.g. ``log.info("prediction", extra={"prediction_id":
..., "model_version": ...})``. The request id is taken from a context variable set by the
request middleware, so it reaches log lines written from worker threads too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from api.context import request_id_var

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats records as JSON objects (``ts``, ``level``, ``logger``, ``message`` + extras)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Route the root, ``api`` and uvicorn loggers to one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Our middleware writes the access log (with request id and route).
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("mlflow", "urllib3", "botocore", "alembic", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
