"""Prometheus metrics of the API (prefix ``dandelion_``), on a registry owned by the app.

The names are a shared contract (dashboards and alert rules use them); see docs/api.md.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dandelion_lib.core.face_settings import MonitoringSettings
from dandelion_lib.core.labels import UNCERTAIN, UNKNOWN
from dandelion_lib.lifecycle.monitoring import DriftMonitor

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics"]

# ``*_created`` timestamp series add nothing to dashboards here and double the output.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ApiMetrics:
    """Every metric the API exports, registered on a private ``CollectorRegistry``.

    ``drift_psi_threshold`` only names the threshold in the drift share's help text; the
    served model's :class:`DriftMonitor` applies it (both from ``Settings``).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        drift_psi_threshold: float | None = None,
        live_accuracy_floor: float = 0.9,
    ):
        if drift_psi_threshold is None:
            drift_psi_threshold = float(
                MonitoringSettings.model_fields["drift_psi_threshold"].default
            )
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # Registered in this order, which is the order of the exposition text.
        self._add_http(r)
        self._add_predictions(r)
        self._add_model(r)
        self._add_queue(r)
        self.invalid_inputs = Counter(
            "dandelion_invalid_inputs", "Rejected inputs, by reason.", ["reason"], registry=r
        )
        self._add_feedback(r, live_accuracy_floor)
        self._add_drift(r, drift_psi_threshold)
        self._add_dependencies(r)

    def _add_http(self, r: CollectorRegistry) -> None:
        """Every request, by route template (see api/middleware.py)."""
        self.http_requests = Counter(
            "dandelion_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "dandelion_http_request_duration_seconds",
            "HTTP request duration by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _add_predictions(self, r: CollectorRegistry) -> None:
        self.predictions = Counter(
            "dandelion_predictions", "Predictions served, by answered label.", ["label"], registry=r
        )
        # Exported at 0 from the start, so increase() sees the first 'unknown' answers (the
        # alert DandelionUnknownShareJump) and the first 'uncertain' ones.
        for answer in (UNCERTAIN, UNKNOWN):
            self.predictions.labels(label=answer)
        self.review_predictions = Counter(
            "dandelion_review_predictions",
            "Answers to reviewers looking again at photos already answered (purpose=review): "
            "not counted in dandelion_predictions, drift or the prediction log.",
            registry=r,
        )
        self.confidence = Histogram(
            "dandelion_prediction_confidence",
            "Confidence (top probability) of served predictions.",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )

    def _add_model(self, r: CollectorRegistry) -> None:
        self.model_info = Info("dandelion_model", "The model version being served.", registry=r)
        self.model_loaded = Gauge(
            "dandelion_model_loaded", "1 when a model is loaded and warm.", registry=r
        )
        self.reload_failures = Counter(
            "dandelion_model_reload_failures",
            "Model versions that failed to load (the previous one kept serving).",
            registry=r,
        )

    def _add_queue(self, r: CollectorRegistry) -> None:
        """Micro-batching and admission (api/services)."""
        self.batch_size = Histogram(
            "dandelion_inference_batch_size",
            "Images per model call (micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "dandelion_queue_depth", "Images admitted and not yet answered.", registry=r
        )
        self.queue_capacity = Gauge(
            "dandelion_queue_capacity", "Images admitted at most before 503.", registry=r
        )
        self.queue_rejections = Counter(
            "dandelion_queue_rejections",
            "Requests answered 503 because the queue was full.",
            registry=r,
        )

    def _add_feedback(self, r: CollectorRegistry, live_accuracy_floor: float) -> None:
        self.feedback = Counter(
            "dandelion_feedback",
            "Feedback received, by whether the model agreed.",
            ["agreement"],
            registry=r,
        )
        for agreement in ("agree", "disagree"):
            self.feedback.labels(agreement=agreement)
        self.live_accuracy = Gauge(
            "dandelion_live_accuracy",
            "Share of recent feedback where the model's label was correct (NaN: no feedback).",
            registry=r,
        )
        self.live_accuracy.set(float("nan"))
        self.live_accuracy_floor = Gauge(
            "dandelion_live_accuracy_floor",
            "Live accuracy below which DandelionLiveAccuracyLow fires "
            "(DANDELION_LIVE_ACCURACY_FLOOR).",
            registry=r,
        )
        self.live_accuracy_floor.set(live_accuracy_floor)

    def _add_drift(self, r: CollectorRegistry, drift_psi_threshold: float) -> None:
        self.drift_psi = Gauge(
            "dandelion_drift_psi",
            "Population stability index of served images vs the training reference.",
            ["feature"],
            registry=r,
        )
        self.drift_share = Gauge(
            "dandelion_drift_share",
            f"Share of features whose PSI exceeds both {drift_psi_threshold} "
            "(DANDELION_DRIFT_PSI_THRESHOLD) and the noise floor "
            "of the current window size.",
            registry=r,
        )
        self.drift_window = Gauge(
            "dandelion_drift_window_images", "Served images in the drift window.", registry=r
        )

    def _add_dependencies(self, r: CollectorRegistry) -> None:
        self.dependency_failures = Counter(
            "dandelion_dependency_failures",
            "Requests answered 503 because a dependency (feedback, registry) was busy or "
            "past its deadline.",
            ["dependency", "reason"],
            registry=r,
        )
        for dependency in ("feedback", "registry"):
            for reason in ("busy", "timeout"):
                self.dependency_failures.labels(dependency=dependency, reason=reason)

    def set_model(self, name: str | None, version: str | None, alias: str) -> None:
        self.model_info.info({"name": name or "", "version": version or "", "alias": alias})
        self.model_loaded.set(1)

    def update_drift(self, monitor: DriftMonitor | None) -> None:
        if monitor is None:
            self.drift_window.set(0)
            return
        scores, share = monitor.snapshot()
        for feature, value in scores.items():
            self.drift_psi.labels(feature=feature).set(value)
        self.drift_share.set(share)
        self.drift_window.set(len(monitor))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def scrape(self, drift: DriftMonitor | None) -> bytes:
        """The exposition text for ``GET /metrics``, with the drift gauges brought up to date."""
        self.update_drift(drift)
        return self.render()

    def count_invalid(self, reason: str, n: int = 1) -> None:
        self.invalid_inputs.labels(reason=reason).inc(n)
