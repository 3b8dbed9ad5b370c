"""A kube-proxy look-alike ``/healthz`` server for the network lab's node hosts.

Real nodes answer HAProxy's health checks on kube-proxy's port 10256 and on each
Service's ``healthCheckNodePort``.  The lab needs the same endpoints, switchable
per node and per port while the tests run.  The answer for a port is decided by
whether ``<state-dir>/<port>.down`` exists (503) or not (200), so the test
process flips health by touching a file: no IPC, no restart, no races with
the server's threads.

Run inside a node's namespace::

    python -m lbappliance.testing.healthserver --state-dir DIR --ports 10256,32001 --name node1
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

KUBE_PROXY_HEALTH_PORT = 10256


def down_marker(state_dir: Path, port: int) -> Path:
    """Path whose existence makes ``port`` answer 503 (shared with the lab)."""
    return state_dir / f"{port}.down"


class _DualStackServer(ThreadingHTTPServer):
    """Listens on ``::`` with V6ONLY off so one socket serves IPv4 and IPv6 checks."""

    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _make_handler(name: str, port: int, state_dir: Path) -> type[BaseHTTPRequestHandler]:
    """Build a handler class bound to one port, so each server knows which marker to read."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "lab-healthz/1"
        protocol_version = "HTTP/1.0"  # one request per connection, like a health checker expects

        def _answer(self, with_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/healthz":
                status, payload = 404, {"error": "not found"}
            else:
                healthy = not down_marker(state_dir, port).exists()
                status = 200 if healthy else 503
                payload = {"node": name, "port": port, "healthy": healthy}
            body = (json.dumps(payload) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Node", name)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def log_message(self, format: str, *args: object) -> None:
            """Silence per-request logs: checks every few hundred ms would flood the lab log."""

    return Handler


def serve(name: str, ports: Sequence[int], state_dir: Path) -> None:
    """Serve ``/healthz`` on every port until SIGTERM/SIGINT."""
    state_dir.mkdir(parents=True, exist_ok=True)
    servers = [_DualStackServer(("::", p), _make_handler(name, p, state_dir)) for p in ports]
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}) for s in servers]
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for t in threads:
        t.start()
    print(f"healthserver {name} listening on {','.join(map(str, ports))}", file=sys.stderr, flush=True)
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--ports", required=True, help="comma-separated TCP ports")
    parser.add_argument("--name", required=True, help="node name reported in the answers")
    args = parser.parse_args(argv)
    ports = sorted({int(p) for p in args.ports.split(",") if p.strip()})
    serve(args.name, ports, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
