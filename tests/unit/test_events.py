"""DeferredEvents: Events wait while the leader still writes status, never longer than max_delay."""

from __future__ import annotations

import threading
import time

from lbappliance.edges.events import DeferredEvents


class Recorder:
    def __init__(self, fail_on: object = None) -> None:
        self.sent: list[object] = []
        self.fail_on = fail_on
        self.arrived = threading.Event()

    def __call__(self, item: object) -> None:
        if item == self.fail_on:
            raise RuntimeError("API said no")
        self.sent.append(item)
        self.arrived.set()


def _until(predicate: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_sent_at_once_when_nothing_holds_them() -> None:
    sent = Recorder()
    events = DeferredEvents(sent)
    events.submit("a")
    assert sent.arrived.wait(2)
    assert sent.sent == ["a"]
    events.close()


def test_held_events_wait_for_release_and_keep_their_order() -> None:
    sent = Recorder()
    events = DeferredEvents(sent)
    events.hold()
    for item in "abc":
        events.submit(item)
    time.sleep(0.3)
    assert sent.sent == []
    assert events.pending() == 3
    events.release()
    assert _until(lambda: sent.sent == ["a", "b", "c"])
    events.close()


def test_no_event_waits_longer_than_max_delay() -> None:
    sent = Recorder()
    events = DeferredEvents(sent, max_delay=0.3)
    events.hold()
    start = time.monotonic()
    events.submit("old")
    assert sent.arrived.wait(2)
    assert 0.25 <= time.monotonic() - start < 2
    events.close()


def test_a_full_queue_drops_the_oldest() -> None:
    sent = Recorder()
    events = DeferredEvents(sent, limit=2)
    events.hold()
    for item in "abc":
        events.submit(item)
    assert events.dropped == 1
    events.release()
    assert _until(lambda: sent.sent == ["b", "c"])
    events.close()


def test_a_failed_event_does_not_stop_the_next() -> None:
    sent = Recorder(fail_on="bad")
    events = DeferredEvents(sent)
    events.submit("bad")
    events.submit("good")
    assert _until(lambda: sent.sent == ["good"])
    events.close()


def test_close_sends_what_is_queued_even_when_held() -> None:
    sent = Recorder()
    events = DeferredEvents(sent)
    events.hold()
    events.submit("last words")
    events.close(timeout=2)
    assert sent.sent == ["last words"]
