"""BGP mode scale figure: aggregate requests/s through one VIP with 1, 2 and 3 boxes behind the
lab's FRR ToR, in one run, and how long the ToR takes to route to each box that joins.

    sudo python bench/bgp.py [--seconds 8] [--connections 32]

wrk on the client (a new connection per request) -> ToR (ECMP, L4 hash) -> boxes' HAProxy ->
nodes' responders. Everything shares this machine's cores, so the ceiling is the machine, not
the boxes: the table says how busy the CPUs were, to tell the two apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbappliance.core.models import Service, ServicePort
from lbappliance.testing.bgplab import BgpBox, BgpLab, bgp_state, frr_unavailable_reason
from lbappliance.testing.netlab import lab_unavailable_reason
from lbappliance.testing.planes import lab_nodes
from lbappliance.testing.wrk import run_wrk

VIP, NODE_PORT = "203.0.113.10", 30080


def _cpu_busy() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    reason = lab_unavailable_reason() or frr_unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    service = Service("default", "web", creation="1", ports=(ServicePort("http", "TCP", 80, NODE_PORT),),
                      ingress_ips=(VIP,))
    lab = BgpLab(prefix=f"lbgb{os.getpid() % 1000}", boxes=3, nodes=3)
    boxes: list[BgpBox] = []
    rows = []
    try:
        lab.up()
        lab.serve_nodeports([NODE_PORT])
        lab.serve_health_ports()
        for k, host in enumerate(lab.appliances, start=1):
            config = lab.box_config(host.name)
            box = BgpBox(lab, host.name, config)
            start = time.monotonic()
            box.start(bgp_state(config, [service], lab_nodes(lab)))
            boxes.append(box)
            lab.wait_next_hops(VIP, {b.name for b in boxes}, timeout=60)
            joined = time.monotonic() - start
            busy0, total0 = _cpu_busy()
            result = run_wrk(lab, f"http://{VIP}/", args.seconds, connections=args.connections)
            busy1, total1 = _cpu_busy()
            rows.append((k, result.rps, result.failed, joined, 100 * (busy1 - busy0) / max(1.0, total1 - total0)))
    finally:
        for box in boxes:
            try:
                box.stop()
            except Exception as exc:  # keep tearing down
                print(f"stopping {box.name}: {exc}")
        lab.down()
    print(f"\nBGP mode, one VIP, wrk -c{args.connections} for {args.seconds}s, new connection per request; "
          f"{os.cpu_count()} CPUs shared by client, ToR, boxes and nodes")
    print(f"{'boxes':>5} {'requests/s':>11} {'failed':>7} {'routed after join':>18} {'CPU busy':>9}")
    for k, rps, failed, joined, busy in rows:
        print(f"{k:>5} {rps:>11.0f} {failed:>7} {joined:>16.1f} s {busy:>8.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
