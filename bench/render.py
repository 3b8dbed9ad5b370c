"""Times the pure pipeline: allocate, plan and render at scale. Prints a table.

    python bench/render.py [--services 5000] [--ports 2] [--nodes 50] [--ipam-services 10000]

Targets on a 2-core machine: full pass (5,000 Services x 2 ports x 50 nodes) <= 1.0 s;
IPAM only for 10,000 Services <= 0.5 s. Each figure is the median CPU time of --repeat runs
(the daemon re-reads the same addresses every pass, so parse caches are warm after the first).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lbappliance.core.config import load_pools, parse_config
from lbappliance.core.ipam import allocate
from lbappliance.core.models import Node, Service, ServicePort, parse_address
from lbappliance.core.perf import gc_paused
from lbappliance.core.plan import Snapshot, plan
from lbappliance.core.render import render

POOLS = """
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools:
- name: big
  addresses: [198.18.0.0/17]
"""  # 198.18.0.0/15 is the benchmarking range (RFC 2544); never routed, never contacted.


def services(count: int, ports: int, held: bool = False) -> list[Service]:
    out = []
    for i in range(count):
        ingress = (f"198.18.{i // 256}.{i % 256}",) if held else ()
        out.append(Service(f"ns{i % 20}", f"svc{i}", creation=f"{i:08d}",
                           ports=tuple(ServicePort(f"p{p}", "TCP", 80 + p, 30000 + (i * ports + p) % 2700)
                                       for p in range(ports)), ingress_ips=ingress))
    return out


def nodes(count: int) -> list[Node]:
    return [Node(f"node-{n}", (("InternalIP", f"198.19.0.{n + 1}"),)) for n in range(count)]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median CPU seconds of this process: other work on a 2-core box does not inflate it."""
    samples, result = [], None
    for _ in range(repeat):
        with gc_paused():  # as the daemon runs a pass
            start = time.process_time()
            result = fn()
            samples.append(time.process_time() - start)
    return statistics.median(samples), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--ports", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--ipam-services", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    config = parse_config("")
    pools = load_pools(POOLS)
    svcs = services(args.services, args.ports)
    node_list = nodes(args.nodes)

    t_alloc, allocation = timed(lambda: allocate(pools, svcs), args.repeat)
    snapshot = Snapshot(tuple(svcs), tuple(node_list), pools, config)
    t_plan, state = timed(lambda: plan(snapshot, allocation), args.repeat)
    t_render, rendered = timed(lambda: render(state, config), args.repeat)
    settled = [replace(s, ingress_ips=allocation.assignments[s.key]) for s in svcs]
    t_steady, _ = timed(lambda: allocate(pools, settled), args.repeat)

    ipam_new = services(args.ipam_services, 1)
    ipam_held = services(args.ipam_services, 1, held=True)
    t_ipam_new, _ = timed(lambda: allocate(pools, ipam_new), args.repeat)
    t_ipam_held, _ = timed(lambda: allocate(pools, ipam_held), args.repeat)
    parse_address.cache_clear()
    t_ipam_cold, _ = timed(lambda: allocate(pools, ipam_held), 1)

    full = t_alloc + t_plan + t_render
    rows = [
        (f"allocate {args.services} new Services", t_alloc, None),
        (f"allocate {args.services} Services that hold addresses", t_steady, None),
        (f"plan {args.services}x{args.ports} ports x {args.nodes} nodes", t_plan, None),
        (f"render ({len(rendered.haproxy) // 1024} KiB haproxy.cfg)", t_render, None),
        ("full pass allocate+plan+render", full, 1.0),
        (f"IPAM only, {args.ipam_services} new Services", t_ipam_new, 0.5),
        (f"IPAM only, {args.ipam_services} Services that hold addresses", t_ipam_held, 0.5),
        ("  same, first pass after start (address parse cache cold)", t_ipam_cold, None),
    ]
    print(f"{'step':<58} {'seconds':>8} {'target':>8}  verdict")
    for name, seconds, target in rows:
        verdict = "" if target is None else ("ok" if seconds <= target else "OVER")
        target_text = "-" if target is None else f"{target:.2f}"
        print(f"{name:<58} {seconds:>8.3f} {target_text:>8}  {verdict}")


if __name__ == "__main__":
    main()
