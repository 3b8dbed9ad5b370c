"""What the daemon reports as served after an apply: never a config HAProxy refused."""

from __future__ import annotations

import pytest

from lbappliance.core.models import DesiredState, Problem, Reason
from lbappliance.core.report import recorded_state

OLD = DesiredState(frontends=(), vrrp=(), served={"default/web": ("192.0.2.10",)})
NEW = DesiredState(frontends=(), vrrp=(), served={"default/web": ("192.0.2.10",), "default/api": ("192.0.2.11",)},
                   problems=(Problem("default/bad", Reason.INVALID, "port 0 is out of range"),))


@pytest.mark.parametrize("kind", ["noop", "runtime", "reload"])
def test_a_successful_apply_is_reported_as_served(kind: str) -> None:
    assert recorded_state(kind, NEW, OLD) is NEW


@pytest.mark.parametrize("kind", ["rejected", "failed"])
def test_a_refused_apply_reports_the_previous_state_with_the_new_problems(kind: str) -> None:
    recorded = recorded_state(kind, NEW, OLD)
    assert recorded.served == OLD.served
    assert recorded.problems == NEW.problems


def test_a_refused_first_apply_reports_nothing_served() -> None:
    recorded = recorded_state("rejected", NEW, None)
    assert recorded.served == {}
    assert recorded.frontends == ()
    assert recorded.problems == NEW.problems
