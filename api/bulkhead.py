"""Bulkheads: each dependency gets its own bounded set of threads and a deadline.

A blocking call to a dependency (the feedback database and object store, the model
registry) runs in a daemon thread of its own :class:`Bulkhead`, never in the worker pool
that decodes images for predictions. At most ``limit`` calls of one dependency run at once;
one more is refused at once (:class:`BulkheadFull`), and a call that outlives its
``deadline_s`` is abandoned by the request (:class:`DeadlineExceeded`) while its thread
finishes on its own and still counts against the limit until it does. So a slow or down
dependency costs its own endpoints a fast 503, the other endpoints nothing, and shutdown
never waits for it (daemon threads do not hold the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class BulkheadError(Exception):
    """A dependency call that was not answered (refused or past its deadline)."""

    def __init__(self, bulkhead: Bulkhead, detail: str):
        super().__init__(detail)
        self.bulkhead = bulkhead
        self.detail = detail


class BulkheadFull(BulkheadError):
    """Every slot of the dependency is taken by calls still running."""


class DeadlineExceeded(BulkheadError):
    """The call did not finish within the dependency's deadline."""


class Bulkhead:
    """At most ``limit`` concurrent calls of one dependency, each awaited ``deadline_s``."""

    def __init__(self, name: str, *, limit: int, deadline_s: float):
        if limit < 1 or deadline_s <= 0:
            raise ValueError("a bulkhead needs limit >= 1 and deadline_s > 0")
        self.name = name
        self.limit = limit
        self.deadline_s = deadline_s
        self._lock = threading.Lock()
        self._running = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def running(self) -> int:
        """Calls whose threads have not finished yet (abandoned ones included)."""
        return self._running

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a thread of this bulkhead; its result, or its exception.

        Raises :class:`BulkheadFull` when ``limit`` calls are still running and
        :class:`DeadlineExceeded` when the call takes longer than ``deadline_s``.
        """
        with self._lock:
            if self._running >= self.limit:
                self.refused += 1
                raise BulkheadFull(
                    self, f"{self.name}: {self._running} calls still running (limit {self.limit})"
                )
            self._running += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # abandoned after its deadline
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            finally:
                with self._lock:
                    self._running -= 1
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name=f"{self.name}-call", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.deadline_s)
        except asyncio.CancelledError:  # the request went away (shutdown): the thread goes on
            future.add_done_callback(_consume)
            raise
        except TimeoutError:
            self.timed_out += 1
            # Retrieve a late exception so asyncio does not log it as never retrieved.
            future.add_done_callback(_consume)
            raise DeadlineExceeded(
                self, f"{self.name} did not answer within {self.deadline_s:g} s"
            ) from None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
