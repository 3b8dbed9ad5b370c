"""Kubernetes Events, sent after the writes they describe.

An Event costs the API server about as much as the status write it reports. In a burst of new
Services, sending both at once slows the addresses down, and the addresses are what users wait
for. So Events queue while the leader still has status to write and go out once a pass finds
nothing left to publish. No Event waits longer than ``max_delay`` (steady churn never silences
them), and the queue is bounded: Events are best effort, memory is not.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from ..core.kube import Unreadable
from ..core.models import Reason, Service

log = logging.getLogger(__name__)
Item = TypeVar("Item")


class PendingEvent(NamedTuple):
    """One Event to record on a Service (or on an object we could not read)."""

    service: Service | Unreadable
    reason: Reason
    message: str
    warning: bool = False


class DeferredEvents(Generic[Item]):
    """One sender thread; Events wait while held, except those older than ``max_delay``."""

    def __init__(self, send: Callable[[Item], None], max_delay: float = 30.0, limit: int = 10_000) -> None:
        self._send, self.max_delay, self.limit = send, max_delay, limit
        self._queue: collections.deque[tuple[float, Item]] = collections.deque()
        self._held = False
        self._stopping = False
        self.dropped = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> None:
        with self._cond:
            if len(self._queue) >= self.limit:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("event queue full (%d); dropped %d oldest events so far", self.limit, self.dropped)
            self._queue.append((time.monotonic(), item))
            self._cond.notify()

    def hold(self) -> None:
        """The leader has status writes in flight: Events wait (up to max_delay)."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        """Nothing left to publish: send what waited."""
        with self._cond:
            self._held = False
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop."""
        with self._cond:
            self._stopping, self._held = True, False
            self._cond.notify()
        self._thread.join(timeout)

    def _next(self) -> Item | None:
        with self._cond:
            while True:
                if self._queue:
                    waited = time.monotonic() - self._queue[0][0]
                    if not self._held or waited >= self.max_delay:
                        return self._queue.popleft()[1]
                    self._cond.wait(self.max_delay - waited)
                elif self._stopping:
                    return None
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            try:
                self._send(item)
            except Exception:  # best effort: a failed Event never stops the ones after it
                log.exception("sending an event failed")
