"""Polling until something holds: the one wait loop of the tests, the benches and the lab."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition",
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call `predicate` every `interval` s until it returns something truthy, and return that.

    Raises TimeoutError naming `what` and the last value after `timeout` s. Exceptions of the
    `ignore` types count as "not yet" (an API server that is still starting, for example).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def holds_within(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """True once `predicate` holds within `timeout` s, else False: for `assert holds_within(...), why`,
    where the message shows the state that did not come."""
    try:
        wait_for(predicate, timeout, interval)
    except TimeoutError:
        return False
    return True
