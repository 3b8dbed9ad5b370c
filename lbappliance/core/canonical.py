"""One canonicalising validator for every value a tenant, a node or a file hands the appliance.

Whatever reaches a rendered file (haproxy.cfg, keepalived.conf, the nft ruleset) passes through
here first and is rendered from the value returned, never from the text given. The rules are
closed sets of characters checked with `re.fullmatch` (`re.match(r"...$")` accepts a trailing
newline), because Python's parsers are more lenient than the formats we render into: `ipaddress`
accepts `2001:db8::5%<anything but % and />` — newlines, quotes and braces included — as an IPv6
zone id and keeps it in `str()`.

Each function returns the canonical value or raises `Invalid`, whose message quotes the value
(truncated: a 1 MiB annotation must not become a 1 MiB log line) but not the field: the caller
knows the field and prefixes it.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SHOWN_CHARACTERS = 64  # how much of a bad value a message repeats
MESSAGE_LIMIT = 1024  # no Problem message (log line, Event, status.json entry) is longer

_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_NETWORK_CHARS = re.compile(r"[0-9A-Fa-f:./]{2,49}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")
_ABS_PATH = re.compile(r"/[A-Za-z0-9_./@+-]{0,4095}")
_DURATION = re.compile(r"([0-9]{1,10})(ms|s|m|h)")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
HAPROXY_MAX_TIMEOUT_MS = 2**31 - 1  # HAProxy's timers are signed 32-bit milliseconds

# Kubernetes Node address types that must hold an IP address; the others name hosts.
IP_ADDRESS_TYPES = frozenset({"InternalIP", "ExternalIP"})


class Invalid(ValueError):
    """A value refused; the message says what is wrong with it, the caller names the field."""


def truncate(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """`repr(value)` for a message, cut to about `limit` characters and saying how long it was."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def shown(value: Any, limit: int = SHOWN_CHARACTERS) -> str:
    """Short printable text as it is (a name in `Service ns/name`), anything else as `truncate` does."""
    if isinstance(value, str) and len(value) <= limit and value.isprintable() and "'" not in value:
        return value
    return truncate(value, limit)


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A whole message cut to `limit` characters: the last guard before a log line or an Event."""
    if len(message) <= limit:
        return message
    tail = f"... ({len(message)} characters)"
    return message[: limit - len(tail)] + tail


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{truncate(value)} is not {what} (not a string)")
    return value


def _unusable_characters(text: str) -> str | None:
    """Why `text` cannot be an address: the characters that would leak into a rendered file."""
    if "%" in text:
        return "IPv6 zone ids (%...) are not allowed"
    if any(c.isspace() for c in text):
        return "whitespace is not allowed"
    if any(not c.isprintable() for c in text):
        return "control characters are not allowed"
    return None


def address(value: Any) -> IPAddress:
    """An IPv4 or IPv6 address, canonical enough for the API server: no zone id, no whitespace,
    no IPv4-mapped IPv6 (`::ffff:192.0.2.1` is IPv4 to Go, IPv6 to Python)."""
    return _address(_text(value, "an IP address"))


@lru_cache(maxsize=1 << 16)
def _address(text: str) -> IPAddress:
    """Memoised: every pass reads the same addresses again (refusals are not cached)."""
    if not _ADDRESS_CHARS.fullmatch(text):
        why = _unusable_characters(text) or "only hex digits, ':' and '.' are allowed"
        raise Invalid(f"{truncate(text)} is not an IP address: {why}")
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"{truncate(text)} is not an IP address") from None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        raise Invalid(f"{truncate(text)} is an IPv4-mapped IPv6 address; write the IPv4 address")
    return parsed


def address_text(value: Any) -> str:
    """`address(value)` as the text every rendered file uses."""
    return str(address(value))


def network(value: Any, strict: bool = False) -> IPNetwork:
    """A CIDR (`198.51.100.0/24`; host bits allowed unless `strict`, as Kubernetes allows them in
    loadBalancerSourceRanges), or a bare address taken as a host network."""
    return _network(_text(value, "a CIDR"), strict)


@lru_cache(maxsize=1 << 14)
def _network(text: str, strict: bool) -> IPNetwork:
    if not _NETWORK_CHARS.fullmatch(text):
        why = _unusable_characters(text) or "only hex digits, ':', '.' and '/' are allowed"
        raise Invalid(f"{truncate(text)} is not a CIDR: {why}")
    try:
        parsed = ipaddress.ip_network(text, strict=strict)
    except ValueError as exc:
        raise Invalid(f"{truncate(text)} is not a CIDR: {exc}") from None
    if isinstance(parsed, ipaddress.IPv6Network) and parsed.network_address.ipv4_mapped is not None:
        raise Invalid(f"{truncate(text)} is an IPv4-mapped IPv6 network; write the IPv4 network")
    return parsed


def integer(value: Any, low: int, high: int, what: str) -> int:
    """An int (not a bool, not a float) in `low..high`."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Invalid(f"{truncate(value)} is not {what} ({low}-{high})")
    return value


def port(value: Any) -> int:
    return integer(value, 1, 65535, "a port")


def node_port(value: Any) -> int:
    """A nodePort or healthCheckNodePort: the apiserver's range is configurable, the wire's is not."""
    return integer(value, 1, 65535, "a port")


def affinity_timeout(value: Any) -> int:
    """sessionAffinityConfig.clientIP.timeoutSeconds, as Kubernetes bounds it."""
    return integer(value, 1, 86400, "a timeout in seconds")


def duration(value: Any) -> str:
    """An HAProxy time (`5s`, `250ms`, `1h`) HAProxy's 32-bit millisecond timers can hold."""
    text = _text(value, "a duration")
    found = _DURATION.fullmatch(text)
    if not found:
        raise Invalid(f"{truncate(text)} is not a duration (digits then ms, s, m or h)")
    if int(found[1]) * _DURATION_MS[found[2]] > HAPROXY_MAX_TIMEOUT_MS:
        raise Invalid(f"{truncate(text)} is longer than HAProxy's limit of {HAPROXY_MAX_TIMEOUT_MS} ms")
    return text


def _matching(value: Any, what: str, pattern: re.Pattern[str], why: str) -> str:
    """`value` as text when the whole of it matches `pattern`; else Invalid saying `why`."""
    text = _text(value, what)
    if not pattern.fullmatch(text):
        raise Invalid(f"{truncate(text)} is not {what} ({why})")
    return text


def dns_label(value: Any) -> str:
    """An RFC 1123 label, as Kubernetes namespaces and Service names are."""
    return _matching(value, "a DNS label", _DNS_LABEL, "lowercase letters, digits, '-'; at most 63")


def dns_subdomain(value: Any) -> str:
    """An RFC 1123 subdomain, as Kubernetes Node names are."""
    text = _text(value, "a DNS subdomain")
    if len(text) > 253 or not _DNS_SUBDOMAIN.fullmatch(text) or any(len(p) > 63 for p in text.split(".")):
        raise Invalid(f"{truncate(text)} is not a DNS subdomain (lowercase letters, digits, '-', '.'; at most 253)")
    return text


def label_value(value: Any) -> str:
    """A Kubernetes label value shape (non-empty): letters, digits, '-', '_', '.', at most 63."""
    return _matching(value, "a label value", _LABEL_VALUE, "letters, digits, '-', '_', '.'; at most 63")


def node_address(kind: str, value: Any) -> str:
    """One entry of a Node's status.addresses: an IP for InternalIP/ExternalIP, else a host name
    or an IP. kube-apiserver checks these only for duplicates, so a kubelet can write anything."""
    if kind in IP_ADDRESS_TYPES:
        return address_text(value)
    text = _text(value, "a host name")
    if _ADDRESS_CHARS.fullmatch(text) and ":" in text:
        return address_text(text)
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        raise Invalid(f"{truncate(text)} is neither a host name nor an IP address")
    return text


def interface(value: Any) -> str:
    return _matching(value, "an interface name", _INTERFACE, "[A-Za-z0-9_.@-], at most 15")


def absolute_path(value: Any) -> str:
    text = _text(value, "an absolute path")
    if not _ABS_PATH.fullmatch(text):
        raise Invalid(f"must be an absolute path of [A-Za-z0-9_./@+-], got {truncate(text)}")
    return text


def address_and_port(value: Any) -> tuple[IPAddress, int]:
    """`ADDRESS:PORT` (`[IPv6]:PORT`) taken apart, both validated."""
    text = _text(value, "ADDRESS:PORT")
    host, sep, port_text = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
        raise Invalid(f"must be ADDRESS:PORT, got {truncate(text)}")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        parsed = address(host[1:-1] if bracketed else host)
    except Invalid as exc:
        raise Invalid(f"must be ADDRESS:PORT: {exc}") from None
    if (parsed.version == 6) != bracketed:
        raise Invalid(f"must be ADDRESS:PORT with an IPv6 address in brackets, got {truncate(text)}")
    return parsed, int(port_text)


def host_port(value: Any) -> str:
    """`ADDRESS:PORT` (`[IPv6]:PORT`), returned in canonical spelling."""
    parsed, port = address_and_port(value)
    return f"[{parsed}]:{port}" if parsed.version == 6 else f"{parsed}:{port}"


# Addresses never to be a Service VIP, whatever a pool says: what `bind` or VRRP would make of them.
_NEVER_VIPS: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "the unspecified / 'this network' range (bind would listen on all)"),
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local (the VRRP anchors' default range)"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast (VRRP itself is 224.0.0.18)"),
    (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address"),
    (ipaddress.ip_network("::/128"), "the unspecified address (bind would listen on all)"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("::ffff:0:0/96"), "IPv4-mapped IPv6 (write the IPv4 address)"),
    (ipaddress.ip_network("fe80::/10"), "link-local (the VRRP anchors' default range)"),
    (ipaddress.ip_network("ff00::/8"), "multicast (VRRP itself is ff02::12)"),
)


def never_a_vip(first: IPAddress, last: IPAddress) -> str | None:
    """Why some address in `first..last` can never be a Service VIP, or None."""
    for net, why in _NEVER_VIPS:
        if net.version == first.version and int(first) <= int(net.broadcast_address) and \
                int(net.network_address) <= int(last):
            return f"contains {why} addresses ({net})"
    return None


# ---- BGP (FRR's frr.conf): closed sets too, since a value with a space or a newline would become
# another FRR command.
_COMMUNITY = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_LARGE_COMMUNITY = re.compile(r"([0-9]{1,10}):([0-9]{1,10}):([0-9]{1,10})")
WELL_KNOWN_COMMUNITIES = frozenset({"no-export", "no-advertise", "local-AS", "graceful-shutdown", "blackhole"})
_BGP_PASSWORD = re.compile(r"[A-Za-z0-9_.,:;@%+=/^~-]{1,80}")  # TCP-MD5 keys are at most 80 bytes
_FRR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def asn(value: Any) -> int:
    """A 4-byte BGP AS number (0 and 65535 / 4294967295 are reserved, RFC 7300)."""
    number = integer(value, 1, 4294967294, "an AS number")
    if number == 65535:
        raise Invalid("65535 is a reserved AS number (RFC 7300)")
    return number


def router_id(value: Any) -> str:
    """A BGP router id: a dotted-quad IPv4 address (FRR refuses anything else), not 0.0.0.0."""
    parsed = address(value)
    if parsed.version != 4 or int(parsed) == 0:
        raise Invalid(f"{truncate(value)} is not a router id (a non-zero IPv4 address)")
    return str(parsed)


def community(value: Any) -> str:
    """A standard (`AS:NN`, each 0-65535), large (`A:B:C`) or well-known BGP community."""
    text = _text(value, "a BGP community")
    if text in WELL_KNOWN_COMMUNITIES:
        return text
    found = _COMMUNITY.fullmatch(text)
    if found and all(int(part) <= 65535 for part in found.groups()):
        return f"{int(found[1])}:{int(found[2])}"
    found = _LARGE_COMMUNITY.fullmatch(text)
    if found and all(int(part) <= 4294967295 for part in found.groups()):
        return ":".join(str(int(part)) for part in found.groups())
    raise Invalid(f"{truncate(text)} is not a BGP community (AS:NN, A:B:C or one of "
                  f"{', '.join(sorted(WELL_KNOWN_COMMUNITIES))})")


def is_large_community(canonical_community: str) -> bool:
    return canonical_community.count(":") == 2


def bgp_password(value: Any) -> str:
    """A BGP session's TCP-MD5 key as frr.conf takes it: one word of safe characters, at most 80."""
    return _matching(value, "a BGP password", _BGP_PASSWORD, "letters, digits and _.,:;@%+=/^~-; 1 to 80")


def frr_name(value: Any) -> str:
    """A name FRR keeps (a BFD profile, a route-map): a letter or digit, then letters, digits, '_', '-'."""
    return _matching(value, "an FRR name", _FRR_NAME, "letters, digits, '_', '-'; at most 63")
