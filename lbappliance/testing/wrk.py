"""wrk from the lab's client host: load during reloads and node churn, throughput for the benches."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .netlab import NetworkLab


@dataclass(frozen=True)
class WrkResult:
    requests: int
    non_2xx: int
    socket_errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    raw: str

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors


def wrk_argv(url: str, seconds: int, connections: int = 8, threads: int = 1, close: bool = True) -> list[str]:
    """New connection per request by default: a reload must not refuse or reset any of them."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def start_wrk(lab: NetworkLab, url: str, seconds: int, cpus: str | None = None, connections: int = 8,
              threads: int = 1, close: bool = True) -> subprocess.Popen[str]:
    """wrk from the client host; `cpus` (a taskset list) pins it, for benchmarks."""
    pin = ["taskset", "-c", cpus] if cpus else []
    argv = wrk_argv(url, seconds, connections, threads, close)
    return subprocess.Popen(["ip", "netns", "exec", lab.client.netns, *pin, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_wrk(proc: subprocess.Popen[str], timeout: float = 120) -> WrkResult:
    out, _ = proc.communicate(timeout=timeout)
    return parse_wrk(out)


def run_wrk(lab: NetworkLab, url: str, seconds: int, cpus: str | None = None, connections: int = 8,
            threads: int = 1, close: bool = True) -> WrkResult:
    return finish_wrk(start_wrk(lab, url, seconds, cpus, connections, threads, close), timeout=seconds + 60)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(text: str) -> WrkResult:
    """wrk's summary; any socket error (connect/read/write/timeout) or non-2xx counts as a failure."""
    requests = re.search(r"(\d+) requests in", text)
    if requests is None:
        raise AssertionError(f"wrk produced no summary:\n{text}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    return WrkResult(
        requests=int(requests.group(1)),
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=_latency_ms(text, "50"),
        p99_ms=_latency_ms(text, "99"),
        raw=text,
    )
