"""A bounded HTTP prober run inside a lab host: counts failures and the longest outage.

    python -m lbappliance.testing.prober --url http://192.0.2.200/ --duration 5 --interval 0.02

Prints one JSON line: requests, ok, failed, longest gap in seconds (first failure to next
success), and which backends answered. Stdlib only, so it runs with `python3 -I` anywhere.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import urllib.parse


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
