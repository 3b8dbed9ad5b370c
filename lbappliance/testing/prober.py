"""A bounded HTTP prober run inside a lab host: counts failures and the longest outage.

    python -m lbappliance.testing.prober --url http://192.0.2.200/ --duration 5 --interval 0.02

Prints one JSON line: requests, ok, failed, longest gap in seconds (first failure to next
success), and which backends answered. Stdlib only, so it runs with `python3 -I` anywhere.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any


def probe_once(host: str, port: int, path: str, timeout: float) -> str | None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
        return body if response.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()


def run(url: str, duration: float, interval: float, timeout: float) -> dict[str, object]:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").strip("[]")
    port = parts.port or 80
    ok = failed = 0
    answered: dict[str, int] = {}
    gap_start: float | None = None
    longest = 0.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        started = time.monotonic()
        body = probe_once(host, port, parts.path or "/", timeout)
        if body is None:
            failed += 1
            gap_start = started if gap_start is None else gap_start
        else:
            ok += 1
            answered[body] = answered.get(body, 0) + 1
            if gap_start is not None:
                longest = max(longest, time.monotonic() - gap_start)
                gap_start = None
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    if gap_start is not None:
        longest = max(longest, time.monotonic() - gap_start)
    return {"requests": ok + failed, "ok": ok, "failed": failed, "longest_gap_s": round(longest, 3),
            "answered_by": answered}


# Round robin over VIPs, a new connection per request: ok/fail per VIP, and the longest gap
# between two successes (the outage a failover causes). Connect/read timeouts are arguments
# because failover measurement wants them short: a request in flight on the box that dies is
# lost, and a long timeout would hide the outage. Stdlib only, run with `python3 -I -S`.
MULTI_PROBE = r"""
import json, socket, sys, time
vips, port, duration, interval = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
connect_timeout, read_timeout = float(sys.argv[5]), float(sys.argv[6])
req = b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n"
ok = {v: 0 for v in vips}
fail = {v: 0 for v in vips}
last_ok = None
max_gap = 0.0
end = time.monotonic() + duration
print("ready", flush=True)
i = 0
while time.monotonic() < end:
    vip = vips[i % len(vips)]
    i += 1
    t = time.monotonic()
    try:
        with socket.create_connection((vip, port), timeout=connect_timeout) as s:
            s.settimeout(read_timeout)
            s.sendall(req)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        good = data.startswith(b"HTTP/1.1 200")
    except OSError:
        good = False
    now = time.monotonic()
    if good:
        ok[vip] += 1
        if last_ok is not None:
            max_gap = max(max_gap, now - last_ok)
        last_ok = now
    else:
        fail[vip] += 1
    time.sleep(max(0.0, interval - (time.monotonic() - t)))
print(json.dumps({"ok": ok, "fail": fail, "max_gap": max_gap}), flush=True)
"""


def start_multi_probe(netns: str, vips: Sequence[str], seconds: float, port: int = 80, interval: float = 0.005,
                      connect_timeout: float = 0.5, read_timeout: float = 1.0) -> subprocess.Popen[str]:
    """Start MULTI_PROBE in network namespace `netns`; returns once it is probing."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-I", "-S", "-c", MULTI_PROBE,
                             ",".join(vips), str(port), str(seconds), str(interval), str(connect_timeout),
                             str(read_timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def finish_multi_probe(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """{"ok": {vip: n}, "fail": {vip: n}, "max_gap": seconds} once the probe has run its course."""
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=0.25)
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.duration, args.interval, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
