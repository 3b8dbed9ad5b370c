"""The one traffic prober of the tests, the benches and the lab, run inside a lab host.

A new connection (TCP: one HTTP request; UDP: one datagram from a fresh socket, so a new flow)
per request, round robin over the targets, for a fixed time or a fixed number of requests. It
counts successes and failures per target, which backend answered (the nodes answer with their
name), and the longest gap between two successes: the outage a failover causes. Connect and read
timeouts are short on purpose for failover figures: a request in flight on the box that dies is
lost, and a long timeout would hide the outage.

Stdlib only, and run as a file (`python3 -I -S prober.py ...`), so it needs neither this package
nor a virtualenv inside the namespace:

    python3 -I -S lbappliance/testing/prober.py --target 192.0.2.200:80 --duration 5 --interval 0.02

prints "ready" once started, then one JSON line (see `ProbeResult`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n"


def split_target(target: str) -> tuple[str, int]:
    """'192.0.2.1:80' or '[2001:db8::1]:80' -> (address, port)."""
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def ask_http(address: str, port: int, connect_timeout: float, read_timeout: float,
             source: str | None = None) -> str | None:
    """The body of a 200 answer (stripped), or None for anything else; from `source` when given."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if source:
                s.bind((source, 0))
            s.settimeout(connect_timeout)
            s.connect((address, port))
            s.settimeout(read_timeout)
            s.sendall(HTTP_REQUEST)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return None
    return body.decode(errors="replace").strip()


def ask_udp(address: str, port: int, payload: bytes, timeout: float) -> str | None:
    """The answering node's name when the echo responder sends back "<node> <payload>"."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(payload, (address, port))
            data, _ = s.recvfrom(2048)
        except OSError:
            return None
    node, _, echoed = data.partition(b" ")
    return node.decode(errors="replace") if echoed == payload else None


def probe(targets: Sequence[str], proto: str = "http", duration: float = 5.0, interval: float = 0.02,
          connect_timeout: float = 0.5, read_timeout: float = 1.0, count: int = 0,
          sources: Sequence[str] = ()) -> dict[str, Any]:
    """Probe until `duration` s have passed (or `count` requests were made, when given).

    With `sources` (HTTP) the requests come from each source address in turn, as that many
    clients, and `by_source` keeps the last answer each got (None: failed)."""
    parsed = [split_target(t) for t in targets]
    ok = {t: 0 for t in targets}
    fail = {t: 0 for t in targets}
    answered: dict[str, int] = {}
    by_source: dict[str, str | None] = {}
    started = time.monotonic()
    last_ok: float | None = None
    max_gap = 0.0
    good = True
    end = started + duration
    i = 0
    while (i < count) if count else (time.monotonic() < end):
        target, (address, port) = targets[i % len(targets)], parsed[i % len(parsed)]
        t = time.monotonic()
        if proto == "udp":
            body = ask_udp(address, port, f"q{i}".encode(), read_timeout)
        else:
            source = sources[i % len(sources)] if sources else None
            body = ask_http(address, port, connect_timeout, read_timeout, source)
            if source:
                by_source[source] = body
        i += 1
        now = time.monotonic()
        good = body is not None
        if body is not None:
            ok[target] += 1
            answered[body] = answered.get(body, 0) + 1
            if last_ok is not None:
                max_gap = max(max_gap, now - last_ok)
            last_ok = now
        else:
            fail[target] += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
    finished = time.monotonic()
    if not good and last_ok is not None:  # still failing at the end: the outage lasts at least this long
        max_gap = max(max_gap, finished - last_ok)
    return {"ok": ok, "fail": fail, "max_gap": round(max_gap, 4), "answered_by": answered,
            "since_last_ok": round(finished - (last_ok if last_ok is not None else started), 4),
            "by_source": by_source}


@dataclass(frozen=True)
class ProbeResult:
    """What a probe saw: per target and in total, who answered, and the longest outage."""

    ok_by: dict[str, int]
    fail_by: dict[str, int]
    max_gap: float
    answered_by: dict[str, int]
    since_last_ok: float
    by_source: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return sum(self.ok_by.values())

    @property
    def failed(self) -> int:
        return sum(self.fail_by.values())

    def counts(self) -> dict[str, int]:
        """Answers by backend, with failures under "error" (only when there were some)."""
        return {**self.answered_by, **({"error": self.failed} if self.failed else {})}


def probe_argv(targets: Sequence[str], *, proto: str = "http", duration: float = 5.0, interval: float = 0.02,
               connect_timeout: float = 0.5, read_timeout: float = 1.0, count: int = 0,
               sources: Sequence[str] = ()) -> list[str]:
    """The command line that runs this file with these settings (prefix it with `ip netns exec NS`)."""
    argv = [sys.executable, "-I", "-S", __file__, "--proto", proto, "--duration", str(duration),
            "--interval", str(interval), "--connect-timeout", str(connect_timeout),
            "--read-timeout", str(read_timeout), "--count", str(count)]
    for target in targets:
        argv += ["--target", target]
    for source in sources:
        argv += ["--source", source]
    return argv


def target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _first_line(fd: int) -> str:
    """One line read straight from the pipe, a byte at a time: a buffered readline could swallow the
    result line too when a short probe (5 refused requests) prints both at once, and `communicate`
    reads the pipe itself, not that buffer."""
    line = b""
    while not line.endswith(b"\n") and (byte := os.read(fd, 1)):
        line += byte
    return line.decode(errors="replace").strip()


class Probe:
    """The prober running in network namespace `netns` while the caller acts; a context manager.

        with Probe(netns, ["192.0.2.200:80"], seconds=6) as probe:
            ...  # fail something over
        probe.result.max_gap
    """

    def __init__(self, netns: str, targets: Sequence[str], seconds: float, **settings: Any) -> None:
        self.argv = ["ip", "netns", "exec", netns, *probe_argv(targets, duration=seconds, **settings)]
        self.seconds = seconds
        self.proc: subprocess.Popen[str] | None = None
        self._result: ProbeResult | None = None

    def start(self) -> Probe:
        """Returns once the prober runs (its first request is under way)."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        first = _first_line(self.proc.stdout.fileno())
        if first != "ready":
            self.proc.kill()
            raise RuntimeError(f"prober did not start: {first} {self.proc.communicate()[0]}")
        return self

    def finish(self, timeout: float | None = None) -> ProbeResult:
        """Wait for the probe to run its course and return what it saw."""
        assert self.proc is not None, "not started"
        try:
            out, _ = self.proc.communicate(timeout=timeout if timeout is not None else self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        data = json.loads(out.strip().splitlines()[-1])
        self._result = ProbeResult(data["ok"], data["fail"], data["max_gap"], data["answered_by"],
                                   data["since_last_ok"], data.get("by_source") or {})
        return self._result

    @property
    def result(self) -> ProbeResult:
        assert self._result is not None, "the probe has not finished"
        return self._result

    def __enter__(self) -> Probe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.finish()


def probe_in(netns: str, targets: Sequence[str], count: int, **settings: Any) -> ProbeResult:
    """`count` requests at once (no pause between them), for sampling which backends answer."""
    settings.setdefault("interval", 0.0)
    probe = Probe(netns, targets, seconds=0.0, count=count, **settings)
    probe.start()
    return probe.finish(timeout=count * 2 * (settings.get("read_timeout", 1.0) + 1) + 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", action="append", required=True, help="address:port; repeat for round robin")
    parser.add_argument("--proto", choices=("http", "udp"), default="http")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--connect-timeout", type=float, default=0.5)
    parser.add_argument("--read-timeout", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=0, help="stop after this many requests (0: run --duration)")
    parser.add_argument("--source", action="append", default=[], help="a client address; repeat for many clients")
    args = parser.parse_args()
    print("ready", flush=True)
    print(json.dumps(probe(args.target, args.proto, args.duration, args.interval, args.connect_timeout,
                           args.read_timeout, args.count, args.source)), flush=True)


if __name__ == "__main__":
    main()
