"""Rendered configs are byte-stable: one golden pair per shape, regenerated with --update-golden."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lbappliance.core.nft import render_nft
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render

from ..shapes import SHAPES, config, pools

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def rendered(shape: str, shuffle_seed: int | None = None) -> dict[str, str]:
    services, nodes = SHAPES[shape]
    services, nodes = list(services), list(nodes)
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        rng.shuffle(services)
        rng.shuffle(nodes)
    _, state = desired_state(Snapshot(tuple(services), tuple(nodes), pools(), config()))
    out = render(state, config())
    return {"haproxy.cfg": out.haproxy, "keepalived.conf": out.keepalived, "nftables.nft": render_nft(state.udp)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_render_matches_golden(shape: str, update_golden: bool) -> None:
    files = rendered(shape)
    for name, text in files.items():
        path = GOLDEN / shape / name
        if update_golden:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"{path} missing: run pytest --update-golden and review the diff"
        assert text == path.read_text(), f"{path} differs from the renderer; review, then --update-golden"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_render_is_independent_of_input_order(shape: str) -> None:
    assert rendered(shape) == rendered(shape, shuffle_seed=7) == rendered(shape, shuffle_seed=99)


def test_excluded_nodes_never_become_servers() -> None:
    text = rendered("single-port")["haproxy.cfg"]
    assert "server node-1 198.51.100.11:30080 track hc_10256_v4/node-1" in text
    assert "server node-2 198.51.100.12:30080" in text
    for excluded in ("node-3", "node-4", "node-5"):
        assert f"server {excluded} " not in text


def test_local_policy_checks_health_check_node_port() -> None:
    text = rendered("local-policy")["haproxy.cfg"]
    assert "server node-1 198.51.100.11:32100 check" in text and "10256" not in text
    assert "server node-1 198.51.100.11:31080 track hc_32100_v4/node-1" in text


def test_each_node_is_checked_once_however_many_services_use_it() -> None:
    """Two ports (two backends) on one check port: one check per node, every server tracks it."""
    text = rendered("multi-port")["haproxy.cfg"]
    checks = [line for line in text.splitlines() if line.strip().startswith("server") and line.endswith(" check")]
    assert checks == ["    server node-1 198.51.100.11:10256 check", "    server node-2 198.51.100.12:10256 check"]
    trackers = [line for line in text.splitlines() if " track " in line]
    assert len(trackers) == 4 and all(t.split()[-1] in ("hc_10256_v4/node-1", "hc_10256_v4/node-2") for t in trackers)
    assert all(t.split()[1] == t.split()[-1].split("/")[1] for t in trackers)  # each tracks its own node


def test_dual_stack_nodes_are_checked_on_the_address_the_service_uses() -> None:
    text = rendered("udp-dns")["haproxy.cfg"]
    assert "server node-1 [2001:db8:0:2::11]:30053 track hc_10256_v6/node-1" in text
    assert "server node-2 198.51.100.12:30053 track hc_10256_v4/node-2" in text
    assert "backend hc_10256_v6\n" in text and "server node-1 [2001:db8:0:2::11]:10256 check" in text


def test_source_ranges_become_an_acl() -> None:
    text = rendered("source-ranges")["haproxy.cfg"]
    assert "acl allowed_sources src 192.0.2.7/32 198.51.100.0/24" in text
    assert "tcp-request connection reject unless allowed_sources" in text


def test_shared_ip_services_bind_the_same_vip() -> None:
    text = rendered("shared-ip")["haproxy.cfg"]
    assert "bind 192.0.2.200:53" in text and "bind 192.0.2.200:853" in text


def test_ipv6_binds_and_vrrp_instance() -> None:
    files = rendered("ipv6")
    assert "bind [2001:db8:0:1::c8]:80" in files["haproxy.cfg"]
    assert "server node-1 [2001:db8:0:2::11]:30086" in files["haproxy.cfg"]
    assert "2001:db8:0:1::c8/128 dev eth0" in files["keepalived.conf"]
    assert "unicast_src_ip 2001:db8:0:1::2" in files["keepalived.conf"]


def test_no_eligible_nodes_renders_an_empty_backend() -> None:
    text = rendered("no-eligible-nodes")["haproxy.cfg"]
    assert "listen be_default_lonely_tcp80_v4" in text
    assert "    server " not in text


def _advertised(keepalived_conf: str) -> list[str]:
    blocks, inside = [], False
    for line in keepalived_conf.splitlines():
        if line.strip() == "virtual_ipaddress {":
            inside = True
        elif inside and line.strip() == "}":
            inside = False
        elif inside:
            blocks.append(line.strip())
    return blocks


def test_advertised_addresses_do_not_depend_on_services() -> None:
    # keepalived drops adverts whose address count differs from its own; two boxes that have
    # not yet seen the same Service change must still agree on the advert.
    adverts = {tuple(_advertised(rendered(shape)["keepalived.conf"])) for shape in SHAPES}
    assert adverts == {("169.254.64.51/32 dev eth0 scope link", "169.254.64.52/32 dev eth0 scope link",
                        "fe80::64:52/128 dev eth0", "fe80::64:53/128 dev eth0")}
