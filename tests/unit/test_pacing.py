"""When the daemon applies: paced after slow applies, and never in the middle of the leader's writes."""

from __future__ import annotations

import pytest

from lbappliance.daemon.pacing import FREE_APPLY, MAX_APPLY_GAP, apply_at, apply_gap


def test_quick_applies_are_not_paced() -> None:
    assert apply_gap(0.05) == 0.0
    assert apply_gap(FREE_APPLY) == 0.0


def test_slow_applies_leave_the_cpu_to_others_for_a_while_but_never_long() -> None:
    assert apply_gap(0.8) == pytest.approx(3 * (0.8 - FREE_APPLY))
    assert apply_gap(60.0) == MAX_APPLY_GAP


def test_no_writes_means_only_the_pacing_gap_counts() -> None:
    assert apply_at(paced_until=12.0, writing_since=None) == 12.0
    assert apply_at(paced_until=0.0, writing_since=None) == 0.0


def test_while_the_leader_writes_addresses_applies_wait_at_most_max_gap() -> None:
    assert apply_at(paced_until=0.0, writing_since=100.0) == 100.0 + MAX_APPLY_GAP
    # The later of the two wins: a long pacing gap is not shortened by the writes.
    assert apply_at(paced_until=200.0, writing_since=100.0) == 200.0
