"""When the daemon may apply: the debounce-and-pacing state, owned by one small object.

An apply (validate + reload at thousands of Services: most of a box's CPU) may start only
APPLY_PACING x the part of the last apply's duration beyond FREE_APPLY after it ended, at most
MAX_APPLY_GAP seconds: a burst then costs a few reloads, while a change to a small or quiet
cluster (applies well under FREE_APPLY) is served at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

APPLY_PACING = 3.0
FREE_APPLY = 0.2
MAX_APPLY_GAP = 5.0


def apply_gap(apply_seconds: float) -> float:
    """Seconds the next apply waits after one that took `apply_seconds` (see APPLY_PACING)."""
    return min(MAX_APPLY_GAP, APPLY_PACING * max(0.0, apply_seconds - FREE_APPLY))


def apply_at(paced_until: float, writing_since: float | None) -> float:
    """When the next apply may run: after the pacing gap and, while the leader is still writing
    new addresses, at most every MAX_APPLY_GAP.

    An apply (validate + reload, ~1 s at 1,000 Services) in the middle of a burst delays the next
    addresses by as long; the pass after the writes, which our own writes trigger, serves them
    all at once.
    """
    return max(paced_until, writing_since + MAX_APPLY_GAP if writing_since is not None else 0.0)


@dataclass
class ApplyPacer:
    """Decides whether this pass applies, and how long the loop may sleep before the paced one."""

    clock: Callable[[], float] = time.monotonic
    paced_until: float = 0.0
    writing_since: float | None = None
    deferred: bool = False  # a pass published (or woke) but left serving to a later, paced apply

    def due(self) -> bool:
        return self.clock() >= apply_at(self.paced_until, self.writing_since)

    def writes(self, pending: bool) -> None:
        """The leader has status writes in this pass (or none left)."""
        if not pending:
            self.writing_since = None
        elif self.writing_since is None:
            self.writing_since = self.clock()

    def defer(self) -> None:
        self.deferred = True

    def applied(self, seconds: float) -> None:
        """An apply that took `seconds` ended now."""
        self.writing_since = None
        self.deferred = False
        self.paced_until = self.clock() + apply_gap(seconds)

    def sleep_bound(self, period: float) -> float:
        """The loop's sleep, shortened so a deferred apply runs when it becomes due."""
        if not self.deferred:
            return period
        return min(period, max(0.0, apply_at(self.paced_until, self.writing_since) - self.clock()))
