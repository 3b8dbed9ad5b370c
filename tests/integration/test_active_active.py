"""Active-active VRRP: VIPs spread over two instances with mirrored priorities, so both boxes carry
traffic; killing one moves only its share and the survivor's own VIPs never miss a request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbappliance.core.models import DesiredState, Service, vip_owner_states
from lbappliance.edges.apply import DataPlane
from lbappliance.testing.netlab import NetworkLab
from lbappliance.testing.planes import (
    NODE_PORT,
    active_active_configs,
    dataplane,
    dual_nodes,
    dual_state,
    held_vips,
    many_services,
)
from lbappliance.testing.prober import Probe, target
from lbappliance.testing.wait import holds_within

pytestmark = pytest.mark.integration

SERVICES = 20


@pytest.fixture
def pair(lab: NetworkLab, tmp_path: Path) -> Iterator[tuple[dict[str, DataPlane], dict[str, DesiredState]]]:
    lab.serve_nodeports([NODE_PORT])
    lab.serve_health_ports()
    configs = active_active_configs(tmp_path)
    planes = {box: dataplane(lab, config, box) for box, config in configs.items()}
    states = {box: dual_state(configs[box], many_services(), dual_nodes(lab)) for box in configs}
    try:
        for box, dp in planes.items():
            dp.start()
            assert dp.apply(states[box]).kind == "reload"
        yield planes, states
    finally:
        for dp in planes.values():
            dp.stop()


def test_both_boxes_carry_vips_and_losing_one_moves_only_its_share(
        lab: NetworkLab, pair: tuple[dict[str, DataPlane], dict[str, DesiredState]]) -> None:
    planes, states = pair
    state = states["app1"]
    assert state.vip_instances == states["app2"].vip_instances  # both boxes place VIPs alike
    by_instance: dict[str, list[str]] = {}
    for vip, instance in state.vip_instances.items():
        by_instance.setdefault(instance, []).append(vip)
    expected = {"app1": set(by_instance.get("VI_v4", [])), "app2": set(by_instance.get("VI_v4_1", []))}
    assert expected["app1"] and expected["app2"], by_instance

    mirrored = {"app1": {"VI_v4": "MASTER", "VI_v4_1": "BACKUP", "VI_v6": "MASTER", "VI_v6_1": "BACKUP"},
                "app2": {"VI_v4": "BACKUP", "VI_v4_1": "MASTER", "VI_v6": "BACKUP", "VI_v6_1": "MASTER"}}

    def settled() -> bool:
        return (all(planes[box].vrrp_states() == mirrored[box] for box in planes)
                and held_vips(lab, "app1") == expected["app1"] and held_vips(lab, "app2") == expected["app2"])

    assert holds_within(settled, 15), (held_vips(lab, "app1"), held_vips(lab, "app2"), planes["app1"].vrrp_states())
    owners = {box: vip_owner_states(state, planes[box].vrrp_states()) for box in planes}
    share = {box: sum(1 for s in owners[box].values() if s == "MASTER") for box in planes}
    print(f"\nactive-active share of {SERVICES} VIPs: {share}; vrrp app1 {planes['app1'].vrrp_states()}, "
          f"app2 {planes['app2'].vrrp_states()}")
    assert share == {"app1": len(expected["app1"]), "app2": len(expected["app2"])}
    all_vips = sorted(state.vip_instances)
    assert holds_within(lambda: all(lab.http_get("client", f"http://{v}/", timeout=1)[0] == 200 for v in all_vips), 10)

    with Probe(lab.client.netns, [target(v, 80) for v in all_vips], 6, interval=0.005) as probe:
        time.sleep(1.5)
        planes["app2"].keepalived.kill()  # app2 fails hard: no goodbye advert
        planes["app2"].haproxy.stop(sig=9, timeout=5)
    result = probe.result
    survivors = sum(result.fail_by[target(v, 80)] for v in expected["app1"])
    moved = sum(result.fail_by[target(v, 80)] for v in expected["app2"])
    ok = result.ok
    print(f"killing app2: {ok} ok; failed on app1's VIPs {survivors}, on app2's (moved) VIPs {moved}")
    assert survivors == 0, result
    assert min(result.ok_by[target(v, 80)] for v in expected["app1"]) > 10, result
    assert held_vips(lab, "app1") == set(all_vips)
    assert set(planes["app1"].vrrp_states().values()) == {"MASTER"}
    assert all(lab.http_get("client", f"http://{v}/", timeout=1)[0] == 200 for v in sorted(expected["app2"]))


def test_pinned_vip_goes_to_its_instance(lab: NetworkLab, tmp_path: Path) -> None:
    configs = active_active_configs(tmp_path)
    services = many_services(4)
    pinned = [Service(s.namespace, s.name, creation=s.creation, ingress_ips=s.ingress_ips, ports=s.ports,
                      annotations={"lbappliance.io/vrrp-instance": "1"}) for s in services]
    state = dual_state(configs["app1"], pinned, dual_nodes(lab))
    assert set(state.vip_instances.values()) == {"VI_v4_1"}
    bad = [Service("default", "bad", creation="1", ingress_ips=("192.0.2.230",), ports=services[0].ports,
                   annotations={"lbappliance.io/vrrp-instance": "2"})]
    refused = dual_state(configs["app1"], bad, dual_nodes(lab))
    assert refused.served == {} and "is not an instance index 0..1" in refused.problems[0].message
