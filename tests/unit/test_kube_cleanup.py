"""Which Services the leader releases: only its own, never another implementation's."""

from __future__ import annotations

import pytest

from lbappliance.core.kube import needs_cleanup
from lbappliance.core.models import FINALIZER, Service

OURS, OTHER = "lbappliance.io/lb", "example.com/other-lb"


def svc(**kw: object) -> Service:
    return Service("ns", "web", finalizers=(FINALIZER,), ingress_ips=("192.0.2.10",), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [None, OURS])
def test_type_change_away_from_load_balancer_is_released(cls: str | None) -> None:
    assert needs_cleanup(svc(type="ClusterIP"), cls)
    assert needs_cleanup(svc(type="NodePort", load_balancer_class=cls), cls)


def test_deleting_a_service_we_handle_is_released() -> None:
    assert needs_cleanup(svc(deleting=True), None)
    assert needs_cleanup(svc(deleting=True, load_balancer_class=OURS), OURS)


def test_a_served_service_is_not_released() -> None:
    assert not needs_cleanup(svc(), None)
    assert not needs_cleanup(svc(load_balancer_class=OURS), OURS)


@pytest.mark.parametrize("deleting", [False, True])
def test_another_implementations_service_keeps_its_finalizer_and_status(deleting: bool) -> None:
    """The default appliance (no class) and one with a class both leave a foreign class alone."""
    assert not needs_cleanup(svc(load_balancer_class=OTHER, deleting=deleting), None)
    assert not needs_cleanup(svc(load_balancer_class=OTHER, deleting=deleting), OURS)


def test_without_the_finalizer_there_is_nothing_to_release() -> None:
    assert not needs_cleanup(Service("ns", "web", type="ClusterIP"), None)
