"""The served model: background loading, alias polling and atomic hot swaps.

:class:`ModelManager` loads ``models:/<name>@<alias>`` in a background thread, then checks
the alias every ``reload_interval_s``. When the alias points to a new version it loads
that exact version (``models:/<name>/<version>``), warms it, and swaps one reference:
requests already decoded for the old version finish on it, new ones use the new one, so
no request fails during a swap. A version that fails to load is recorded (``/model``,
logs, ``dandelion_model_reload_failures_total``) and the previous model keeps serving; it
is not retried until the alias moves again or an admin forces a reload.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.bulkhead import Bulkhead, BulkheadError, BulkheadFull
from api.context import shutting_down
from api.metrics import ApiMetrics
from api.problems import Problem
from api.schemas import (
    LoadFailureInfo,
    ModelInfo,
    ModelRef,
    Readiness,
    ReloadResponse,
    ServingInfo,
)
from dandelion_lib.core.config import Settings
from dandelion_lib.lifecycle.monitoring import DriftMonitor
from dandelion_lib.lifecycle.registry import configure_mlflow
from dandelion_lib.serving.predict import SERVING_TAG, Predictor

log = logging.getLogger("api.model")
SHUTDOWN_POLL_S = 0.25
"""How often a waiting reload looks whether the server is shutting down."""

Loader = Callable[[str], Predictor]


@dataclass(frozen=True)
class ServingModel:
    """One loaded version and its live drift window (replaced as a whole on swap)."""

    predictor: Predictor
    alias: str
    loaded_at: dt.datetime
    drift: DriftMonitor

    @property
    def name(self) -> str | None:
        return self.predictor.name

    @property
    def version(self) -> str | None:
        return self.predictor.version


@dataclass
class LoadFailure:
    version: str | None
    error: str
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def info(self) -> LoadFailureInfo:
        return LoadFailureInfo(version=self.version, error=self.error, at=self.at.isoformat())


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one registry check."""

    action: str  # "loaded" | "unchanged" | "failed" | "skipped" | "no-alias" | "registry-error"
    version: str | None
    detail: str = ""


class ModelManager:
    """Keeps the current :class:`ServingModel` in sync with the registry alias."""

    def __init__(
        self,
        settings: Settings,
        metrics: ApiMetrics,
        *,
        loader: Loader | None = None,
    ):
        self.settings = settings
        self.metrics = metrics
        self.name = settings.tracking.model_name
        self.alias = settings.serving.model_alias
        self._loader = loader or self._default_loader
        self._current: ServingModel | None = None
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self.last_failure: LoadFailure | None = None
        self.last_check_at: dt.datetime | None = None
        self.last_check: CheckResult | None = None
        self.state = "starting"
        self.reason = f"checking the registry for models:/{self.name}@{self.alias}"
        # Admin reloads run here, never in the request worker pool; the poller has its own
        # thread. One reload at a time (a second waits for the first's lock anyway).
        self.reloads = Bulkhead("registry", limit=1, deadline_s=settings.serving.reload_timeout_s)

    # --- public ----------------------------------------------------------------------------
    @property
    def current(self) -> ServingModel | None:
        """The model serving now (one atomic reference read)."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def drift(self) -> DriftMonitor | None:
        """The live drift window of the model serving now (``None`` before the first load)."""
        current = self._current
        return current.drift if current is not None else None

    def readiness(self) -> Readiness:
        """What ``GET /health/ready`` shows (``status`` is ``ready`` or ``not_ready``)."""
        current = self._current
        if current is None:
            return Readiness(status="not_ready", reason=self.reason or self.state)
        return Readiness(status="ready", model=ModelRef(name=current.name, version=current.version))

    async def reload(self) -> ReloadResponse:
        """Check the registry now, retrying a version that failed before.

        Answers within ``reload_timeout_s``: past it (or while another reload still runs)
        :class:`Problem` 503; the check goes on and ``GET /model`` shows its outcome.
        """
        call = asyncio.ensure_future(self.reloads.call(self.check, True))
        while not call.done():  # the deadline, or the server's shutdown, ends the wait
            await asyncio.wait({call}, timeout=SHUTDOWN_POLL_S)
            if shutting_down.is_set() and not call.done():
                call.cancel()
                raise Problem(
                    503,
                    "shutting-down",
                    "the server is shutting down; the reload was not finished (GET /model on "
                    "the next instance shows the model it serves)",
                    headers={"Retry-After": "30"},
                )
        try:
            result = call.result()
        except BulkheadError as exc:
            raise self._reload_unavailable(exc) from None
        return ReloadResponse(
            action=result.action,
            version=result.version,
            detail=result.detail,
            model=self.describe(),
        )

    def _reload_unavailable(self, exc: BulkheadError) -> Problem:
        if isinstance(exc, BulkheadFull):
            reason, code = "busy", "reload-busy"
            detail = "a reload is already running; GET /model shows its outcome"
        else:
            reason, code = "timeout", "reload-timeout"
            detail = (
                f"the registry check did not finish within {exc.bulkhead.deadline_s:g} s "
                f"(registry {self.registry_uri}); it goes on, GET /model shows its outcome"
            )
        self.metrics.dependency_failures.labels(dependency="registry", reason=reason).inc()
        log.warning("reload not answered: %s", exc.detail)
        return Problem(503, code, detail, headers={"Retry-After": "30"})

    @property
    def registry_uri(self) -> str:
        """The registry's address, without credentials (for messages)."""
        return redact_uri(self.settings.resolved_tracking_uri)

    def start(self) -> None:
        """Load in the background and poll the alias until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop polling (a load in progress cannot be interrupted; the thread is a daemon)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, force: bool = False) -> CheckResult:
        """Resolve the alias now and load the version it names when it is new.

        ``force`` also retries a version that failed before.
        """
        with self._check_lock:
            result = self._check(force)
            self.last_check = result
            self.last_check_at = dt.datetime.now(dt.UTC)
            return result

    # --- internals -------------------------------------------------------------------------
    def _default_loader(self, uri: str) -> Predictor:
        return Predictor.load_for_users(uri, self.settings)

    def _registry(self) -> Any:
        if self._client is None:
            self._client = configure_mlflow(self.settings)
        return self._client

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # never let the poller die
                log.exception("model check failed unexpectedly")
            # First load: retry sooner while nothing is served.
            interval = self.settings.serving.reload_interval_s
            if self._current is None:
                interval = min(interval, 5.0)
            self._wake.wait(interval)
            self._wake.clear()

    def _check(self, force: bool) -> CheckResult:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._registry().get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            message = _first_line(exc)
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or (
                "not found" in message.lower() or "does not exist" in message.lower()
            ):
                return self._no_alias(message)
            return self._registry_error(message)
        except Exception as exc:
            return self._registry_error(_first_line(exc))
        version = str(mv.version)
        current = self._current
        # The same version is reloaded only when the gate changed its served precision.
        precision = (mv.tags or {}).get(SERVING_TAG + "precision")
        if (
            current is not None
            and current.version == version
            and current.predictor.serving.get(SERVING_TAG + "precision") == precision
        ):
            return CheckResult("unchanged", version)
        failed = self.last_failure
        if not force and failed is not None and failed.version == version:
            return CheckResult("skipped", version, f"version {version} failed to load before")
        return self._load(version)

    def _no_alias(self, message: str) -> CheckResult:
        detail = f"no version of model {self.name!r} has alias {self.alias!r}"
        if self._current is None:
            self.state, self.reason = "waiting", detail
        log.warning("registry check: %s", detail, extra={"detail": message})
        return CheckResult("no-alias", None, detail)

    def _registry_error(self, message: str) -> CheckResult:
        detail = f"model registry {self.registry_uri} unavailable: {message}"
        if self._current is None:
            self.state, self.reason = "waiting", detail
        log.warning("registry check failed: %s", message)
        return CheckResult("registry-error", None, detail)

    def _load(self, version: str) -> CheckResult:
        uri = f"models:/{self.name}/{version}"
        log.info("loading model", extra={"model_uri": uri, "model_version": version})
        if self._current is None:
            self.state, self.reason = "loading", f"loading {uri}"
        try:
            predictor = self._loader(uri)
        except Exception as exc:
            message = _first_line(exc)
            self.last_failure = LoadFailure(version, message)
            self.metrics.reload_failures.inc()
            if self._current is None:
                self.state, self.reason = "failed", f"cannot load {uri}: {message}"
            log.error(
                "model version failed to load; %s",
                "keeping the current one" if self._current else "no model is served",
                extra={
                    "model_uri": uri,
                    "model_version": version,
                    "serving_version": self._current.version if self._current else None,
                    "error": message,
                },
            )
            return CheckResult("failed", version, message)
        previous = self._current
        self._current = ServingModel(
            predictor=predictor,
            alias=self.alias,
            loaded_at=dt.datetime.now(dt.UTC),
            drift=DriftMonitor(
                predictor.drift_reference,
                window=self.settings.monitoring.drift_window,
                threshold=self.settings.monitoring.drift_psi_threshold,
            ),
        )
        self.last_failure = None
        self.state, self.reason = "ready", ""
        self.metrics.set_model(predictor.name or self.name, predictor.version, self.alias)
        log.info(
            "model swapped in" if previous else "model loaded",
            extra={
                "model_uri": uri,
                "model_version": predictor.version,
                "previous_version": previous.version if previous else None,
            },
        )
        return CheckResult("loaded", version)

    def describe(self) -> ModelInfo:
        """What ``GET /model`` shows."""
        cur = self._current
        p = cur.predictor if cur is not None else None
        return ModelInfo(
            name=self.name,
            alias=self.alias,
            state=self.state,
            reason=self.reason or None,
            version=p.version if p else None,
            uri=p.uri if p else None,
            loaded_at=cur.loaded_at.isoformat() if cur else None,
            dataset_version=p.dataset_version if p else None,
            feature_spec=p.spec.to_dict() if p else None,
            metrics=dict(p.metrics) if p else {},
            openset=p.detector.to_dict() if p and p.detector is not None else None,
            last_failure=self.last_failure.info() if self.last_failure else None,
            last_check_at=self.last_check_at.isoformat() if self.last_check_at else None,
            reload_interval_s=self.settings.serving.reload_interval_s,
            serving=_serving_info(p) if p else None,
        )


def _serving_info(p: Predictor) -> ServingInfo:
    """How ``p`` runs: runtime, precision, the gate's tags and INT8's FP32 recheck."""
    recheck = p.recheck
    return ServingInfo(
        runtime=p.runtime,
        precision=p.precision,
        note=p.runtime_note,
        gate={k.removeprefix(SERVING_TAG): v for k, v in p.serving.items()},
        recheck=None
        if recheck is None
        else {
            "ood_margin": recheck.ood_margin,
            "confidence_margin": recheck.confidence_margin,
            "rechecked": recheck.rechecked,
        },
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def redact_uri(uri: str) -> str:
    """``uri`` with its password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def registry_http_env(settings: Settings) -> dict[str, str]:
    """MLflow HTTP client settings for the API process: fail fast on a down registry.

    MLflow's defaults (7 retries with exponential backoff, 120 s per request) keep a
    registry check busy for minutes; the API names the outage in seconds instead.
    """
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(settings.serving.registry_timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(settings.serving.registry_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
