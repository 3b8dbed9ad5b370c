"""When HAProxy refuses a rendered config, which Services are to blame, and what their Event says."""

from __future__ import annotations

from pathlib import Path

from lbappliance.core.render import services_on_lines
from lbappliance.core.report import refusal_message

CFG = (Path(__file__).resolve().parent.parent / "golden" / "shared-ip" / "haproxy.cfg").read_text()
LINES = CFG.splitlines()


def line_of(text: str, after: int = 0) -> int:
    """1-based number of the first line at or after `after` that starts with `text` (indent ignored)."""
    return next(i for i, line in enumerate(LINES, start=1) if i > after and line.strip().startswith(text))


def test_lines_inside_a_services_section_blame_that_service() -> None:
    a = line_of("# Service dns/tcp-a")
    b = line_of("# Service dns/tcp-b")
    assert services_on_lines(CFG, [line_of("bind", a)]) == {"dns/tcp-a"}
    assert services_on_lines(CFG, [line_of("server", a), line_of("listen", b)]) == {"dns/tcp-a", "dns/tcp-b"}


def test_lines_in_shared_sections_blame_no_service_alone() -> None:
    health = line_of("backend hc_")
    for shared in (line_of("global"), line_of("defaults"), line_of("frontend lbappliance_stats"), health,
                   line_of("server", health)):
        assert services_on_lines(CFG, [shared]) is None, LINES[shared - 1]
    # One shared line among Service lines: HAProxy's complaint is not about those Services only.
    assert services_on_lines(CFG, [line_of("bind", line_of("# Service dns/tcp-a")), line_of("global")]) is None


def test_no_line_or_a_line_past_the_end_blames_no_service() -> None:
    assert services_on_lines(CFG, []) is None
    assert services_on_lines(CFG, [len(LINES) + 5]) is None


def test_the_message_is_the_same_on_every_pass() -> None:
    """pids and line numbers change between passes; the Event is sent once per distinct message."""
    first = ("/run/lbappliance/haproxy.cfg: [NOTICE]   (4242) : haproxy version is 2.6.12\n"
             "[ALERT]    (4242) : config : parsing [/run/lbappliance/haproxy.cfg.candidate:29] : 'bind 192.0.2.5:80'"
             " : cannot bind\n[ALERT]    (4242) : config : Fatal errors found in configuration.")
    later = first.replace("4242", "5151").replace(":29]", ":341]")
    message = refusal_message(first)
    assert message == refusal_message(later)
    assert "NOTICE" not in message and "cannot bind" in message and "haproxy.cfg.candidate]" in message
    assert "(4242)" not in message and len(refusal_message(first * 50)) <= 1000
