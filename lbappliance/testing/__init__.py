"""Harnesses the tests, the benches and `lbappliance lab` share; nothing here runs in production.

    controlplane  a real kube-apiserver + etcd on loopback, with throwaway PKI and kubeconfigs
    netlab        network namespaces: two appliance hosts, a client, nodes (look-alike responders, health)
    kubenodes     the lab's nodes as real nodes: kube-proxy, pods, a lab endpoints controller (e2e, lab)
    apirelay      kube-proxy's way from a node's namespace to the apiserver on the host's loopback
    planes        DataPlanes (HAProxy + keepalived + nft, no daemon) on the lab's appliance hosts
    bgplab        the BGP shape: an FRR ToR (ECMP, BFD, optional resilient groups), N boxes in
                  announce.mode bgp (BgpBox: a DataPlane ticked like the loop), the client behind it
    appliances    the daemon pair on a control plane and the lab (`start_daemons`)
    prober        the one traffic prober (TCP/HTTP and UDP, outage = longest gap between successes)
    wrk           load and throughput with wrk from the client host
    wait          `wait_for`, the one polling loop
    lab           `lbappliance lab up|status|failover|down`, on top of all of the above

Process liveness and stopping come from `lbappliance.edges.processes`, as for the product.
"""
