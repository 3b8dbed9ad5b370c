"""A hostile value under a MetalLB annotation key is validated exactly as under ours: it never reaches
a rendered file (haproxy.cfg, keepalived.conf, nft), its Service gets a Problem, its neighbour is served."""

from __future__ import annotations

import pytest
from hypothesis import given

from lbappliance.core.kube import ObjectError, node_from_object, service_from_object
from lbappliance.core.models import ANN_SHARED
from tests.unit.test_hostile_properties import (
    ADDRESSES,
    MARKER,
    OTHER,
    PROPERTY,
    hostile,
    node_object,
    outputs,
    service_object,
)

KEYS = {f"{prefix}{suffix}": prefixes for prefix in ("metallb.io/", "metallb.universe.tf/")
        for suffix, prefixes in (("loadBalancerIPs", [*ADDRESSES, "192.0.2.201,"]),
                                 ("address-pool", ["default", "reserved"]), ("allow-shared-ip", ["k", "dns"]))}


@pytest.mark.parametrize("key", sorted(KEYS))
def test_hostile_metallb_annotation_never_reaches_a_rendered_file(key: str) -> None:
    @PROPERTY
    @given(hostile(KEYS[key]))
    def check(value: str) -> None:
        obj = service_object()
        obj["metadata"]["annotations"].pop(ANN_SHARED, None)  # ours would win over the alias
        obj["metadata"]["annotations"][key] = value
        try:
            service = service_from_object(obj)
        except ObjectError:
            return
        text, state = outputs((service, OTHER), (node_from_object(node_object()),))
        assert MARKER not in text
        assert "default/other" in state.served
        assert any(p.service == service.key for p in state.problems), value

    check()
