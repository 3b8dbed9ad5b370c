"""BGP announce mode, pure parts: the `announce` schema, which VIPs a box announces, frr.conf golden files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbappliance.core import canonical
from lbappliance.core.bgp import announce_decision, render_frr
from lbappliance.core.config import ConfigError, load_pools, parse_config
from lbappliance.core.models import DesiredState
from lbappliance.core.nft import render_nft
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render

from ..shapes import BGP_SHAPES, POOLS_TEXT, bgp_config

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def _state(shape: str) -> tuple[DesiredState, str]:
    services, nodes, text, _ = BGP_SHAPES[shape]
    config = bgp_config(text)
    pools = load_pools(POOLS_TEXT, "pools.yaml", config.own_addresses())
    return desired_state(Snapshot(services, nodes, pools, config))[1], text


def rendered(shape: str) -> dict[str, str]:
    state, text = _state(shape)
    config = bgp_config(text)
    assert config.announce.bgp is not None
    pools = load_pools(POOLS_TEXT, "pools.yaml", config.own_addresses())
    announced = state.vips if BGP_SHAPES[shape][3] else ()
    out = render(state, config)
    return {"haproxy.cfg": out.haproxy, "keepalived.conf": out.keepalived, "nftables.nft": render_nft(state.udp),
            "frr.conf": render_frr(config.name, config.announce.bgp, announced, pools)}


@pytest.mark.parametrize("shape", sorted(BGP_SHAPES))
def test_frr_conf_matches_golden(shape: str, update_golden: bool) -> None:
    for name, text in rendered(shape).items():
        path = GOLDEN / shape / name
        if update_golden:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"{path} missing: run `make golden` and review the diff"
        assert text == path.read_text(), f"{path} differs from the renderer; review, then `make golden`"


def test_frr_conf_announces_each_vip_with_its_pool_route_map() -> None:
    text = rendered("bgp-dual-stack")["frr.conf"]
    assert "  network 192.0.2.200/32 route-map LB-POOL-default\n" in text
    assert "  network 2001:db8:0:1::c8/128 route-map LB-POOL-default\n" in text
    assert "  network 203.0.113.0/32 route-map LB-POOL-reserved\n" in text
    assert "route-map LB-POOL-default permit 10\n set community 64512:100 no-export\nexit" in text
    assert " set large-community 64512:1:2\n set local-preference 50\n" in text
    # Each session carries its own family only; a BFD profile per distinct timers.
    v4_block = text.split(" address-family ipv4 unicast\n")[1].split("exit-address-family")[0]
    assert "neighbor 192.0.2.1 activate" in v4_block and "2001:db8:0:1::1" not in v4_block
    assert " neighbor 192.0.2.1 password s3cr3t-md5\n" in text
    assert " profile lb-50-50-3\n" in text and " profile slow\n" in text
    assert " neighbor 2001:db8:0:1::1 bfd profile slow\n" in text


def test_ipv4_only_announces_no_ipv6_vip() -> None:
    text = rendered("bgp-ipv4-only")["frr.conf"]
    assert "network 192.0.2.200/32" in text
    assert "address-family ipv6" not in text and "/128" not in text and "router bgp 4200000001" in text


def test_withdrawn_shape_announces_nothing_but_keeps_sessions() -> None:
    text = rendered("bgp-withdrawn")["frr.conf"]
    assert "  network " not in text and "neighbor 192.0.2.1 activate" in text


def test_render_is_byte_stable_under_peer_and_pool_order() -> None:
    config = bgp_config()
    assert config.announce.bgp is not None
    reordered = config.announce.bgp.model_copy(update={"peers": tuple(reversed(config.announce.bgp.peers))})
    vips = ["2001:db8:0:1::c8", "192.0.2.201", "192.0.2.200"]
    assert render_frr("edge-a", config.announce.bgp, vips, ()) == render_frr("edge-a", reordered, vips[::-1], ())


def test_vrrp_stays_the_default() -> None:
    assert parse_config("name: a\n").announce.mode == "vrrp"


BASE = """
announce:
  mode: bgp
  bgp:
    asn: 64512
    routerId: 192.0.2.2
    peers:
    - {address: 192.0.2.1, asn: 64500%s}
%s
"""


@pytest.mark.parametrize(("peer_extra", "bgp_extra", "wanted"), [
    ("", "    families: []", "at least one address family"),
    (", password: 'two words'", "", "not a BGP password"),
    (", password: \"x\\nneighbor 1.2.3.4 remote-as 1\"", "", "not a BGP password"),
    ("", "    pools: {web: {communities: ['65536:1']}}", "not a BGP community"),
    ("", "    pools: {web: {communities: ['1:2 3:4']}}", "not a BGP community"),
    ("", "    pools: {'Bad Pool': {}}", "not a DNS label"),
    ("", "    keepaliveSeconds: 5\n    holdTimeSeconds: 9", "less than 3 x keepaliveSeconds"),
    (", families: [ipv6]", "    families: [ipv4]", "not in families"),
    (", bfd: {profile: 'a b'}", "", "not an FRR name"),
])
def test_bad_bgp_settings_are_refused_naming_the_field(peer_extra: str, bgp_extra: str, wanted: str) -> None:
    text = BASE % (peer_extra, bgp_extra)
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert wanted in str(caught.value) and "announce.bgp" in str(caught.value)


def test_bgp_mode_needs_settings_and_asn_bounds() -> None:
    with pytest.raises(ConfigError, match="mode bgp needs the bgp settings"):
        parse_config("announce: {mode: bgp}\n")
    for bad in ("0", "65535", "4294967295"):
        with pytest.raises(ConfigError, match="AS number"):
            parse_config(BASE.replace("asn: 64512", f"asn: {bad}") % ("", ""))
    with pytest.raises(ConfigError, match="router id"):
        parse_config(BASE.replace("routerId: 192.0.2.2", "routerId: '2001:db8::2'") % ("", ""))
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(BASE % ("}\n    - {address: 192.0.2.1, asn: 64501", ""))
    with pytest.raises(ConfigError, match="two different sets of timers"):
        parse_config(BASE % (", bfd: {profile: p, receiveIntervalMs: 50}}\n    - {address: 192.0.2.9, asn: 1, "
                             "bfd: {profile: p}", ""))


@given(st.text(max_size=100))
def test_hostile_passwords_never_reach_frr_conf_as_more_than_one_word(text: str) -> None:
    try:
        password = canonical.bgp_password(text)
    except canonical.Invalid:
        return
    assert password == text and password.split() == [password] and "!" not in password and "#" not in password


@given(st.text(max_size=30))
def test_hostile_communities_are_canonical_or_refused(text: str) -> None:
    try:
        value = canonical.community(text)
    except canonical.Invalid:
        return
    assert value.split() == [value] and (value in canonical.WELL_KNOWN_COMMUNITIES or value.replace(":", "").isdigit())


# ---- which VIPs a box announces


def _all_up(state: DesiredState) -> dict[tuple[str, str], str]:
    return {(f.backend.name, s.name): "UP" for f in state.frontends for s in f.backend.servers} | \
        {(u.backend.name, s.name): "UP" for u in state.udp for s in u.backend.servers}


def test_announces_every_vip_while_haproxy_serves_it() -> None:
    state, _ = _state("bgp-dual-stack")
    decision = announce_decision(state, True, _all_up(state))
    assert decision.announced == state.vips and not decision.withdrawn and len(state.vips) == 4


def test_haproxy_down_withdraws_everything() -> None:
    state, _ = _state("bgp-dual-stack")
    decision = announce_decision(state, False, _all_up(state))
    assert decision.announced == () and set(decision.withdrawn) == set(state.vips)
    assert set(decision.withdrawn.values()) == {"haproxy is not running"}


def test_a_service_with_no_healthy_backend_here_is_withdrawn_alone() -> None:
    state, _ = _state("bgp-dual-stack")
    fixed = next(f for f in state.frontends if f.service == "default/fixed")
    servers = {key: ("DOWN" if key[0] == fixed.backend.name else status) for key, status in _all_up(state).items()}
    decision = announce_decision(state, True, servers)
    assert decision.withdrawn == {fixed.vip: "no healthy backend from this box"}
    assert set(decision.announced) == set(state.vips) - {fixed.vip}


def test_udp_only_vip_follows_its_check_backend() -> None:
    state, _ = _state("bgp-dual-stack")
    dns = next(u for u in state.udp if u.service == "dns/coredns")
    servers = {key: ("MAINT" if key[0] == dns.backend.name else status) for key, status in _all_up(state).items()}
    assert dns.vip not in announce_decision(state, True, servers).announced
    assert dns.vip in announce_decision(state, True, _all_up(state)).announced


def test_switching_announce_mode_needs_a_restart_but_bgp_settings_reload() -> None:
    from lbappliance.core.reloading import restart_required

    vrrp, bgp = parse_config("name: edge-a\n"), bgp_config()
    assert restart_required(vrrp, bgp) == ("announce.mode",)
    tweaked = parse_config(bgp_config().model_dump_json(by_alias=True).replace('"asn":64512', '"asn":64513'))
    assert tweaked.announce.bgp is not None and tweaked.announce.bgp.asn == 64513
    assert restart_required(bgp, tweaked) == ()


def test_metrics_count_established_sessions_and_announced_routes() -> None:
    from lbappliance.edges.metrics import Metrics

    metrics = Metrics()
    metrics.record_bgp({"sessions": {"192.0.2.1": "Established", "2001:db8:0:1::1": "Active"},
                        "announced": ["203.0.113.10", "203.0.113.11"], "withdrawn": {}})
    assert metrics.registry.get_sample_value("lbappliance_bgp_sessions_up") == 1
    assert metrics.registry.get_sample_value("lbappliance_bgp_routes_announced") == 2
    metrics.record_bgp({"sessions": {"error": "vtysh: no bgpd"}, "announced": []})
    assert metrics.registry.get_sample_value("lbappliance_bgp_sessions_up") == 0
