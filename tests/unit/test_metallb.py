"""MetalLB compatibility: its annotations are aliases of ours (ours win, values validated as ours),
sharing stays inside a namespace, and `pool import` turns IPAddressPools into pools the daemon accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from lbappliance.cli.main import cli
from lbappliance.core import metallb
from lbappliance.core.config import load_pools
from lbappliance.core.ipam import allocate
from lbappliance.core.kube import service_from_object
from lbappliance.core.models import ANN_LB_IPS, ANN_POOL, ANN_SHARED

IPADDRESSPOOLS = Path(__file__).resolve().parent / "metallb_ipaddresspools.yaml"  # as `kubectl get -o yaml` prints it
POOLS = load_pools("apiVersion: lbappliance.io/v1alpha1\nkind: AddressPoolList\npools:\n"
                   "- {name: a, addresses: [192.0.2.200-192.0.2.210]}\n"
                   "- {name: b, addresses: [192.0.2.220-192.0.2.230], autoAssign: false}\n")


def _svc(name: str, annotations: dict[str, str], namespace: str = "default", port: int = 80) -> Any:
    return service_from_object({
        "metadata": {"name": name, "namespace": namespace, "uid": name, "annotations": annotations,
                     "creationTimestamp": f"2026-01-01T00:00:{len(name):02d}Z"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": port, "nodePort": 30000 + port}]}})


@pytest.mark.parametrize("prefix", metallb.METALLB_PREFIXES)
def test_each_metallb_key_is_read_as_ours(prefix: str) -> None:
    svc = _svc("x", {prefix + "loadBalancerIPs": "192.0.2.225", prefix + "address-pool": "b",
                     prefix + "allow-shared-ip": "k"})
    assert (svc.annotations[ANN_LB_IPS], svc.annotations[ANN_POOL], svc.annotations[ANN_SHARED]) == (
        "192.0.2.225", "b", "k")
    assert allocate(POOLS, [svc]).assignments[svc.key] == ("192.0.2.225",)


def test_ours_take_precedence_and_the_newer_metallb_spelling_wins() -> None:
    svc = _svc("x", {ANN_POOL: "a", "metallb.io/address-pool": "b", "metallb.universe.tf/address-pool": "c",
                     "metallb.universe.tf/loadBalancerIPs": "192.0.2.1", "metallb.io/loadBalancerIPs": "192.0.2.205"})
    assert svc.annotations[ANN_POOL] == "a"
    assert svc.annotations[ANN_LB_IPS] == "192.0.2.205"


def test_no_metallb_key_returns_the_same_map() -> None:
    plain = {"a": "b"}
    assert metallb.with_aliases(plain) is plain


@pytest.mark.parametrize("value", ["192.0.2.5\nbind :1", "not-an-ip", "2001:db8::5%eth0"])
def test_an_aliased_value_is_validated_like_ours(value: str) -> None:
    svc = _svc("x", {"metallb.universe.tf/loadBalancerIPs": value})
    allocation = allocate(POOLS, [svc])
    assert svc.key not in allocation.assignments
    assert [p.service for p in allocation.problems] == [svc.key]


def test_sharing_by_metallb_key_stays_in_the_namespace() -> None:
    one = _svc("one", {"metallb.io/allow-shared-ip": "k"}, "ns1", 80)
    two = _svc("two", {"metallb.io/allow-shared-ip": "k"}, "ns1", 443)
    other = _svc("other", {"metallb.universe.tf/allow-shared-ip": "k"}, "ns2", 8080)
    assignments = allocate(POOLS, [one, two, other]).assignments
    assert assignments[one.key] == assignments[two.key]
    assert assignments[other.key] != assignments[one.key]
    assert metallb.cross_namespace_keys([one, two, other]) == {"k": ("ns1", "ns2")}
    assert metallb.cross_namespace_keys([one, two]) == {}


def test_import_carries_every_field_with_a_counterpart() -> None:
    result = metallb.import_pools(yaml.safe_load(IPADDRESSPOOLS.read_text()))
    assert result.refusals == ()
    assert result.pools == (
        {"name": "production", "addresses": ["192.0.2.200-192.0.2.230", "2001:db8:0:1::/120"],
         "autoAssign": True, "avoidBuggyIPs": False},
        {"name": "shop", "addresses": ["192.0.2.240/29"], "autoAssign": False,
         "serviceAllocation": {"priority": 5, "namespaces": ["shop"], "serviceSelectors": [
             {"matchLabels": {"tier": "web"}}]}},
    )


def test_import_refuses_each_field_without_a_counterpart_by_name() -> None:
    doc = {"items": [
        {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "p"},
         "spec": {"addresses": ["192.0.2.0/28"], "serviceAllocation": {"namespaceSelectors": [{}]},
                  "futureField": 1}},
        {"apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement", "metadata": {"name": "l2"}, "spec": {}},
    ]}
    refusals = metallb.import_pools(doc).refusals
    assert len(refusals) == 3, refusals
    assert any("spec.futureField" in r for r in refusals)
    assert any("spec.serviceAllocation.namespaceSelectors" in r and "namespaces" in r for r in refusals)
    assert any("L2Advertisement" in r for r in refusals)


def _run(tmp_path: Path, *args: str) -> Any:
    config = tmp_path / "config.yaml"
    config.write_text("vrrp: {unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3]}\n")
    return CliRunner().invoke(cli, ["pool", *args, "--config", str(config), "--pools", str(tmp_path / "pools.yaml")])


def test_pool_import_writes_pools_the_daemon_accepts_and_is_idempotent(tmp_path: Path) -> None:
    pools_file = tmp_path / "pools.yaml"
    assert _run(tmp_path, "add", "keep", "-a", "198.51.100.0/29").exit_code == 0
    dry = _run(tmp_path, "import", str(IPADDRESSPOOLS), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "+- name: production" in dry.output and "-- name: keep" not in dry.output
    assert "production" not in pools_file.read_text()
    result = _run(tmp_path, "import", str(IPADDRESSPOOLS))
    assert result.exit_code == 0, result.output
    pools = load_pools(pools_file.read_text())
    assert [p.name for p in pools] == ["keep", "production", "shop"]
    assert [p.size() for p in pools] == [8, 31 + 256, 8]
    assert pools[2].priority == 5 and pools[2].namespaces == ("shop",) and not pools[2].auto_assign
    before = pools_file.read_bytes()
    again = _run(tmp_path, "import", str(IPADDRESSPOOLS))
    assert again.exit_code == 0 and pools_file.read_bytes() == before


def test_pool_import_refusal_names_fields_and_leaves_the_file(tmp_path: Path) -> None:
    assert _run(tmp_path, "add", "keep", "-a", "198.51.100.0/29").exit_code == 0
    before = (tmp_path / "pools.yaml").read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                                   "metadata": {"name": "p"},
                                   "spec": {"addresses": ["198.51.100.0/30"],
                                            "serviceAllocation": {"namespaceSelectors": [{"matchLabels": {}}]}}}))
    result = _run(tmp_path, "import", str(bad))
    assert result.exit_code == 1
    assert "spec.serviceAllocation.namespaceSelectors" in result.output
    overlapping = tmp_path / "overlap.yaml"
    overlapping.write_text(yaml.safe_dump({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                                           "metadata": {"name": "p"}, "spec": {"addresses": ["198.51.100.4/30"]}}))
    result = _run(tmp_path, "import", str(overlapping))
    assert result.exit_code == 1 and "overlaps" in result.output
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text(yaml.safe_dump({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
                                       "metadata": {"name": "p\nbind"}, "spec": {"addresses": ["198.51.100.8/30"]}}))
    result = _run(tmp_path, "import", str(hostile))
    assert result.exit_code == 1 and "pool name must be a DNS label" in result.output
    assert (tmp_path / "pools.yaml").read_bytes() == before
