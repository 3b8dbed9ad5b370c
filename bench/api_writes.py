"""CPU per status write from the daemon's side, against the real kube-apiserver. Prints a table.

    sudo python bench/api_writes.py [--services 300] [--rounds 2]

Compares the leader's write path (`Publisher._patch`: the client's pool and credentials, no
generated API method) with the previous one (`CoreV1Api.patch_namespaced_service_status`, which
validates every argument and the body with pydantic first). Both send the same merge patch to the
same Services, interleaved round by round; the figure is this process's CPU time per write (the
API server's own cost is the same for both and not counted). A burst of new Services makes two
writes each (status, then an Event).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lbappliance.edges.cluster import Publisher, _read_json, api_client_from_kubeconfig  # noqa: E402


def body(ip: str) -> dict[str, Any]:
    return {"status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "Proxy"}]}}}


def timed(write: Callable[[str, str], None], names: list[str], ip: str) -> tuple[float, float]:
    """(CPU ms, wall ms) per write of `ip` to every Service in `names`."""
    cpu, wall = time.process_time(), time.perf_counter()
    for name in names:
        write(name, ip)
    return (1000 * (time.process_time() - cpu) / len(names), 1000 * (time.perf_counter() - wall) / len(names))


def main() -> None:
    from kubernetes import client

    from lbappliance.testing.controlplane import ControlPlane, find_binaries

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with ControlPlane(find_binaries(REPO)) as cp:
        api = api_client_from_kubeconfig(str(cp.admin_kubeconfig))
        core = client.CoreV1Api(api)
        names = [f"w{i}" for i in range(args.services)]
        for name in names:
            resp = core.create_namespaced_service("default", {
                "metadata": {"name": name}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}},
                _preload_content=False)
            resp.drain_conn()
            resp.release_conn()
        publisher = Publisher(api, "bench")

        def generated(name: str, ip: str) -> None:
            _read_json(core.patch_namespaced_service_status(name, "default", body(ip), _request_timeout=10,
                                                            _preload_content=False,
                                                            _content_type="application/merge-patch+json"))

        def ours(name: str, ip: str) -> None:
            assert publisher._patch("default", name, body(ip), status=True) is not None

        results: dict[str, list[tuple[float, float]]] = {"generated API method (before)": [],
                                                          "Publisher._patch (now)": []}
        for round_ in range(args.rounds):
            for index, (label, write) in enumerate(zip(results, (generated, ours), strict=True)):
                results[label].append(timed(write, names, f"192.0.2.{1 + 2 * round_ + index}"))
    print(f"{'status write, ' + str(args.services) + ' Services x ' + str(args.rounds) + ' rounds':<44}"
          f" {'CPU ms/write':>12} {'wall ms/write':>13}")
    for label, runs in results.items():
        cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
        print(f"{label:<44} {cpu:>12.2f} {wall:>13.2f}")


if __name__ == "__main__":
    main()
