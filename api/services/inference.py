"""Micro-batching inference off the event loop, behind a bounded admission queue.

Requests first :meth:`InferenceQueue.admit` their images (a fixed capacity: beyond it the
API answers 503 + Retry-After instead of growing memory), decode them in worker threads,
then :meth:`InferenceQueue.predict` the decoded arrays. One inference thread takes every
array waiting (up to ``microbatch_max``) and runs them through the model in one call.
It waits up to ``microbatch_wait_ms`` for more only while other admitted images are still
being decoded, so a lone request never waits and throughput grows with load.

Each array is predicted by the model version it was decoded for (arrays of different
versions in one batch are split), which is what makes model swaps safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from api.metrics import ApiMetrics
from dandelion_lib.serving.predict import Prediction, Predictor

log = logging.getLogger("api.inference")


class QueueFullError(Exception):
    """The admission queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the inference queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Ticket:
    """Room reserved for ``n`` images; each is either submitted or discarded."""

    def __init__(self, n: int):
        self.n = n
        self.unsubmitted = n


@dataclass
class _Job:
    array: np.ndarray
    predictor: Predictor
    future: asyncio.Future[Prediction]
    loop: asyncio.AbstractEventLoop
    explain: bool = False


class InferenceQueue:
    """Bounded admission + one inference thread that batches whatever is waiting."""

    def __init__(
        self,
        metrics: ApiMetrics,
        *,
        max_batch: int = 32,
        wait_ms: float = 5.0,
        capacity: int = 256,
    ):
        self.metrics = metrics
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.capacity = max(1, capacity)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._admitted = 0  # images admitted and not yet answered
        self._decoding = 0  # admitted images not yet submitted for prediction
        self._stop = False
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 0.02  # running estimate, for Retry-After
        metrics.queue_capacity.set(self.capacity)
        metrics.queue_depth.set(0)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for job in self._drain_all():
            _resolve(job, exc=RuntimeError("the server is shutting down"))

    # --- admission -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._admitted

    @contextlib.contextmanager
    def admit(self, n: int = 1) -> Iterator[Ticket]:
        """Reserve room for ``n`` images for the duration of the block (or raise)."""
        with self._cond:
            # A batch larger than the whole capacity still runs when nothing else is queued.
            if self._admitted + n > self.capacity and self._admitted > 0:
                self.metrics.queue_rejections.inc()
                raise QueueFullError(self.retry_after())
            self._admitted += n
            self._decoding += n
            self.metrics.queue_depth.set(self._admitted)
        ticket = Ticket(n)
        try:
            yield ticket
        finally:
            with self._cond:
                self._admitted -= n
                self._decoding -= ticket.unsubmitted
                ticket.unsubmitted = 0
                self.metrics.queue_depth.set(self._admitted)
                self._cond.notify_all()

    def discard(self, ticket: Ticket, n: int = 1) -> None:
        """``n`` images of the ticket will not be submitted (they failed to decode)."""
        with self._cond:
            n = min(n, ticket.unsubmitted)
            ticket.unsubmitted -= n
            self._decoding -= n
            self._cond.notify_all()

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained (at least 1)."""
        return max(1, int(self._admitted * self._seconds_per_image + 0.999))

    # --- prediction ------------------------------------------------------------------------
    async def predict(
        self,
        ticket: Ticket,
        arrays: list[np.ndarray],
        predictor: Predictor,
        *,
        explain: bool = False,
    ) -> list[Prediction]:
        """Predict decoded arrays admitted with ``ticket``; they are queued together, so
        they share model calls with each other and with concurrent requests (``explain``:
        with an explanation each, from the same model call)."""
        if not arrays:
            return []
        loop = asyncio.get_running_loop()
        jobs = [_Job(a, predictor, loop.create_future(), loop, explain) for a in arrays]
        with self._cond:
            if self._stop:
                raise RuntimeError("the server is shutting down")
            if len(jobs) > ticket.unsubmitted:
                raise ValueError("more arrays than the ticket admitted")
            ticket.unsubmitted -= len(jobs)
            self._decoding -= len(jobs)
            self._jobs.extend(jobs)
            self._cond.notify_all()
        return list(await asyncio.gather(*(j.future for j in jobs)))

    # --- worker ----------------------------------------------------------------------------
    def _take_batch(self) -> list[_Job]:
        with self._cond:
            while not self._jobs and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            batch = [self._jobs.popleft()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                if self._jobs:
                    batch.append(self._jobs.popleft())
                    continue
                # Wait only while admitted images are still on their way (being decoded).
                remaining = deadline - time.monotonic()
                if self._decoding <= 0 or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for job in batch:
            groups.setdefault(id(job.predictor), []).append(job)
        for jobs in groups.values():
            start = time.perf_counter()
            try:
                wanted = [j.explain for j in jobs]
                preds = jobs[0].predictor.predict_arrays(
                    np.stack([j.array for j in jobs]), explain=wanted if any(wanted) else False
                )
            except Exception as exc:
                log.error("model call failed", exc_info=exc, extra={"batch_size": len(jobs)})
                for job in jobs:
                    _resolve(job, exc=exc)
                continue
            elapsed = time.perf_counter() - start
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(jobs)
            self.metrics.batch_size.observe(len(jobs))
            for job, pred in zip(jobs, preds, strict=True):
                _resolve(job, result=pred)

    def _drain_all(self) -> list[_Job]:
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs


def _resolve(
    job: _Job, *, result: Prediction | None = None, exc: BaseException | None = None
) -> None:
    def _set() -> None:
        if job.future.done():  # the request was cancelled (client went away)
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # the event loop is closed
        job.loop.call_soon_threadsafe(_set)
