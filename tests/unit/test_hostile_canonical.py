"""The canonicalising validator itself: each rule with the input that slips past the lenient parser."""

from __future__ import annotations

import ipaddress

import pytest

from lbappliance.core import canonical
from lbappliance.core.models import Problem, Reason
from lbappliance.core.plan import bounded_problems


@pytest.mark.parametrize("text", [
    "2001:db8::5%z", "2001:db8::5%z\nlisten x", "fe80::1%eth0", " 192.0.2.1", "192.0.2.1\n", "192.0.2.1 ",
    "192.0.2.1\x00", "::ffff:192.0.2.1", "192.0.2.01", "", "192.0.2.1/32", "١٩٢.0.2.1",
])
def test_addresses_python_accepts_or_mangles_are_refused(text: str) -> None:
    with pytest.raises(canonical.Invalid):
        canonical.address(text)


def test_zone_ids_are_what_python_accepts_and_keeps() -> None:
    """Why the rule exists: str() of the parsed value carries the payload."""
    assert str(ipaddress.ip_address("2001:db8::5%z\nlisten x")).endswith("\nlisten x")
    with pytest.raises(canonical.Invalid, match="zone id"):
        canonical.address("2001:db8::5%z\nlisten x")


def test_addresses_come_back_canonical() -> None:
    assert canonical.address_text("2001:DB8:0:0::1") == "2001:db8::1"
    assert canonical.address_text("192.0.2.1") == "192.0.2.1"


@pytest.mark.parametrize("text", ["2001:db8::%z/64", "198.51.100.0/24\n", "198.51.100.0 /24", "::ffff:0:0/96",
                                  "198.51.100.0/33", "everyone"])
def test_bad_cidrs_are_refused(text: str) -> None:
    with pytest.raises(canonical.Invalid):
        canonical.network(text)


def test_cidrs_keep_kubernetes_leniency_on_host_bits_but_not_when_strict() -> None:
    assert str(canonical.network("198.51.100.7/24")) == "198.51.100.0/24"
    with pytest.raises(canonical.Invalid):
        canonical.network("198.51.100.7/24", strict=True)


@pytest.mark.parametrize("check", [canonical.port, canonical.node_port])
@pytest.mark.parametrize("value", [-1, 0, 65536, True, 80.0, "80", None])
def test_ports_are_ints_in_1_to_65535(check: object, value: object) -> None:
    with pytest.raises(canonical.Invalid):
        check(value)  # type: ignore[operator]


def test_affinity_timeout_and_durations_are_bounded() -> None:
    assert canonical.affinity_timeout(86400) == 86400
    with pytest.raises(canonical.Invalid):
        canonical.affinity_timeout(86401)
    assert canonical.duration("596h") == "596h"
    with pytest.raises(canonical.Invalid, match="limit"):
        canonical.duration("597h")  # past 2^31 - 1 ms
    with pytest.raises(canonical.Invalid):
        canonical.duration("5s\n")


@pytest.mark.parametrize(("check", "text"), [
    (canonical.dns_label, "web\n"), (canonical.dns_label, "a" * 64), (canonical.dns_subdomain, "node-1\n"),
    (canonical.dns_subdomain, "a" * 64 + ".example"), (canonical.interface, "eth0\n"),
    (canonical.absolute_path, "/run/x\n"), (canonical.label_value, "key\n"),
])
def test_names_are_full_matches_not_prefix_matches(check: object, text: str) -> None:
    with pytest.raises(canonical.Invalid):
        check(text)  # type: ignore[operator]


@pytest.mark.parametrize(("text", "canonical_form"), [
    ("127.0.0.1:8405", "127.0.0.1:8405"), ("[2001:DB8::0:1]:9108", "[2001:db8::1]:9108"),
])
def test_host_ports_come_back_canonical(text: str, canonical_form: str) -> None:
    assert canonical.host_port(text) == canonical_form


@pytest.mark.parametrize("text", ["[::1%z\n]:8405", " 127.0.0.1\n:8405", "::1:8405", "127.0.0.1:٨٠", "127.0.0.1:0"])
def test_bad_host_ports_are_refused(text: str) -> None:
    with pytest.raises(canonical.Invalid):
        canonical.host_port(text)


@pytest.mark.parametrize(("kind", "text"), [("InternalIP", "node-1"), ("Hostname", "node 1"),
                                            ("Hostname", "2001:db8::1%z"), ("ExternalDNS", "a\nb")])
def test_node_addresses_are_refused_by_type(kind: str, text: str) -> None:
    with pytest.raises(canonical.Invalid):
        canonical.node_address(kind, text)


def test_truncate_keeps_messages_short_and_says_how_long_the_value_was() -> None:
    assert canonical.truncate("short") == "'short'"
    shown = canonical.truncate("x" * (1 << 20))
    assert len(shown) < 100 and "1048576 characters" in shown
    assert canonical.shown("default") == "default" and canonical.shown("a\nb") == "'a\\nb'"


def test_problem_messages_are_bounded_as_a_whole() -> None:
    long = Problem("default/web", Reason.INVALID, "y" * 5000)
    short = Problem("default/web", Reason.INVALID, "fine")
    bounded = bounded_problems([long, short])
    assert len(bounded[0].message) <= canonical.MESSAGE_LIMIT and bounded[1] is short


@pytest.mark.parametrize(("first", "last", "why"), [
    ("0.0.0.0", "0.0.0.0", "unspecified"), ("126.255.255.250", "127.0.0.3", "loopback"),
    ("223.255.255.0", "224.0.0.20", "multicast"), ("255.255.255.255", "255.255.255.255", "broadcast"),
    ("::ffff:192.0.2.0", "::ffff:192.0.2.9", "IPv4-mapped"), ("fe80::", "fe80::9", "link-local"),
])
def test_ranges_touching_special_addresses_are_never_vips(first: str, last: str, why: str) -> None:
    found = canonical.never_a_vip(ipaddress.ip_address(first), ipaddress.ip_address(last))
    assert found is not None and why in found


def test_ordinary_ranges_are_vips() -> None:
    assert canonical.never_a_vip(ipaddress.ip_address("192.0.2.0"), ipaddress.ip_address("192.0.2.255")) is None
    assert canonical.never_a_vip(ipaddress.ip_address("2001:db8::"), ipaddress.ip_address("2001:db8::ff")) is None
