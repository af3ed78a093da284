"""The retry rules of the DAGs' I/O steps: transient failures are retried with exponential
backoff; a failed quality gate and a deterministic error inside a notebook never are.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

from dandelion_lib.core.config import Settings
from dandelion_tasks.common import current_settings


class GateRetryPolicy(RetryPolicy):
    """Retry transient failures with the task's backoff; never a failed quality gate, never a
    deterministic error inside a notebook.

    A notebook's exception surfaces as Papermill's execution error, whose ``ename`` names the
    original exception: a failed gate (:attr:`GATE_ERRORS`) fails at once, and so does any
    error not in :attr:`TRANSIENT_ERRORS` (a bug or bad data does not heal by re-running the
    notebook). Exceptions of the Python steps follow the task's retries, except the gates'.
    """

    GATE_ERRORS = frozenset({"DatasetQualityError", "DataValidationError", "KernelMissingError"})
    TRANSIENT_ERRORS = frozenset(
        {
            # builtins
            "OSError",
            "ConnectionError",
            "ConnectionResetError",
            "ConnectionRefusedError",
            "ConnectionAbortedError",
            "BrokenPipeError",
            "TimeoutError",
            # dandelion
            "StoreUnavailableError",
            "SourceUnavailableError",
            # httpx, urllib3, requests, botocore, SQLAlchemy
            "TransportError",
            "NetworkError",
            "ConnectError",
            "ReadError",
            "WriteError",
            "RemoteProtocolError",
            "TimeoutException",
            "ConnectTimeout",
            "ReadTimeout",
            "WriteTimeout",
            "PoolTimeout",
            "ProtocolError",
            "MaxRetryError",
            "NewConnectionError",
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "OperationalError",
        }
    )

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Any = None,
    ) -> RetryDecision:
        notebook_error = getattr(exception, "ename", None)
        name = notebook_error or type(exception).__name__
        if name in self.GATE_ERRORS:
            return RetryDecision.fail(f"{name}: a failed quality gate is not retried")
        if notebook_error and notebook_error not in self.TRANSIENT_ERRORS:
            return RetryDecision.fail(f"the notebook raised {name}, which is not transient")
        return RetryDecision.default()

    def serialize(self) -> dict[str, Any]:
        return {"gate_errors": sorted(self.GATE_ERRORS)}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> GateRetryPolicy:
        return cls()


def io_retries(settings: Settings | None = None) -> dict[str, Any]:
    """Retry arguments of the I/O steps: exponential backoff from the settings' delay; no
    retry of a failed quality gate or a non-transient notebook error (:class:`GateRetryPolicy`)."""
    settings = settings or current_settings()
    delay = timedelta(seconds=settings.orchestration.pipeline_retry_delay_s)
    return {
        "retries": settings.orchestration.pipeline_retries,
        "retry_delay": delay,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": max(delay * 8, timedelta(seconds=1)),
        "retry_policy": GateRetryPolicy(),
    }
