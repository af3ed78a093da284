"""Prediction log: served predictions written to the feedback database in the background.

Writing one row per request on the request path would cost a database round trip per
prediction; instead rows are buffered and inserted in bulk every ``flush_interval_s``
by one thread. Lookups (for feedback) see buffered rows first, then the database. The
buffer is bounded: when the database is down for long, the oldest rows are dropped
(counted and logged) rather than growing memory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from dandelion_lib.data.feedback import FeedbackStore, PredictionRecord

log = logging.getLogger("api.recording")


class PredictionLog:
    def __init__(
        self,
        store: FeedbackStore,
        *,
        flush_interval_s: float = 0.5,
        max_pending: int = 10_000,
    ):
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._pending: OrderedDict[str, PredictionRecord] = OrderedDict()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the flusher and write what is buffered, waiting at most ``timeout``.

        The last flush runs in a daemon thread: a database that does not answer cannot hold
        the process (the rows it could not take are logged as lost).
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        last = threading.Thread(target=self.flush, name="prediction-log-final", daemon=True)
        last.start()
        last.join(timeout)
        if last.is_alive():
            with self._lock:
                pending = len(self._pending)
            log.error(
                "the prediction log was not written before shutdown",
                extra={"pending": pending, "timeout_s": timeout},
            )

    def add(self, record: PredictionRecord) -> None:
        with self._lock:
            self._pending[record.prediction_id] = record
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self._lock:
            record = self._pending.get(prediction_id)
        return record if record is not None else self.store.get_prediction(prediction_id)

    def flush(self) -> int:
        """Write buffered rows now; returns how many were written (0 on failure)."""
        with self._flush_lock:
            with self._lock:
                batch = list(self._pending.values())
            if not batch:
                return 0
            try:
                self.store.record_predictions(batch)
            except Exception as exc:
                log.error("cannot write the prediction log: %s", exc, extra={"pending": len(batch)})
                return 0
            with self._lock:
                for record in batch:
                    if self._pending.get(record.prediction_id) is record:
                        del self._pending[record.prediction_id]
            return len(batch)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()
