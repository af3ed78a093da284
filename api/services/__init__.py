"""The API's services (all logic lives here or in dandelion_lib; handlers stay thin)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from api.bulkhead import Bulkhead
from api.metrics import ApiMetrics
from api.services.feedback import FeedbackService
from api.services.inference import InferenceQueue
from api.services.models import Loader, ModelManager
from api.services.predictions import PredictionService
from api.services.recording import PredictionLog
from dandelion_lib.core.config import Settings
from dandelion_lib.core.images import DecodeBudget
from dandelion_lib.data.feedback import FeedbackStore, FeedbackUnavailableError

log = logging.getLogger("api")


@dataclass
class Services:
    settings: Settings
    metrics: ApiMetrics
    models: ModelManager
    queue: InferenceQueue
    recorder: PredictionLog
    predictions: PredictionService
    feedback: FeedbackService

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        loader: Loader | None = None,
        feedback_store: FeedbackStore | None = None,
    ) -> Services:
        metrics = ApiMetrics(
            drift_psi_threshold=settings.monitoring.drift_psi_threshold,
            live_accuracy_floor=settings.feedback.live_accuracy_floor,
        )
        models = ModelManager(settings, metrics, loader=loader)
        queue = InferenceQueue(
            metrics,
            max_batch=settings.serving.microbatch_max,
            wait_ms=settings.serving.microbatch_wait_ms,
            capacity=settings.serving.queue_size,
        )
        budget = DecodeBudget(settings.serving.decode_budget_bytes)
        store = feedback_store or FeedbackStore.from_settings(settings)
        store.decode_budget = budget  # feedback images count against the predictions' budget
        recorder = PredictionLog(store)
        return cls(
            settings=settings,
            metrics=metrics,
            models=models,
            queue=queue,
            recorder=recorder,
            predictions=PredictionService(
                models=models,
                queue=queue,
                metrics=metrics,
                recorder=recorder,
                budget=budget,
            ),
            feedback=FeedbackService(
                store,
                recorder,
                metrics,
                accuracy_window=settings.feedback.feedback_accuracy_window,
                bulkhead=Bulkhead(
                    "feedback",
                    limit=settings.feedback.feedback_concurrency,
                    deadline_s=settings.feedback.feedback_timeout_s,
                ),
            ),
        )

    def start(self) -> None:
        """Start the background threads (model loading first: it takes longest)."""
        self.models.start()
        self.queue.start()
        self.recorder.start()
        threading.Thread(target=self._open_feedback_db, name="feedback-db", daemon=True).start()

    def _open_feedback_db(self) -> None:
        try:
            self.recorder.store.check()  # creates the tables on first use
            self.feedback.refresh_accuracy()
        except FeedbackUnavailableError as exc:
            # Predictions do not need the database; feedback answers 503 until it is back.
            log.error("feedback database unavailable at start-up: %s", exc)

    def stop(self) -> None:
        """Stop the background work; a stuck database holds shutdown at most its timeout."""
        self.models.stop()
        self.queue.stop()
        self.recorder.stop(timeout=self.settings.feedback.feedback_timeout_s)
        self.recorder.store.close()
