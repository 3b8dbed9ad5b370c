#!/usr/bin/env bash
# Installs everything the tests and the lab need, on a fresh Debian 12 machine (as root) or a
# prepared one. Caches live outside the repo (~/.cache/lbappliance) so fresh clones reuse them.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LBAPPLIANCE_CACHE:-$HOME/.cache/lbappliance}"
venv="$cache/venv"
# prometheus: promtool for the alert rule tests (about 20 MB download); faketime: the doctor's clock
# check in the e2e; openssl: `enroll` makes the appliance's key and CSR with it; frr: bgpd, bfdd, zebra,
# vtysh and frr-reload.py for announce.mode bgp (the BGP lab runs its own daemons in namespaces).
packages=(haproxy keepalived iproute2 nftables wrk procps python3-venv ca-certificates prometheus faketime openssl
          frr frr-pythontools)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install Debian packages: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons on install; the appliance runs its own, so stop the stock ones.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now haproxy.service keepalived.service frr.service >/dev/null 2>&1 || true
fi

stamp="$venv/.lbappliance-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: creating virtualenv $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$repo[test]"
  rm -f "$venv"/.lbappliance-*
  touch "$stamp"
else
  # Re-point the editable install at this clone (cheap; no downloads).
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo" >/dev/null 2>&1 \
    || "$venv/bin/pip" install -q --no-deps -e "$repo"
fi

if [ -f "$repo/tools/controlplane/build.sh" ] && [ "${LBAPPLIANCE_SKIP_CONTROLPLANE:-}" != "1" ]; then
  echo "setup: kube-apiserver and etcd (cached build; built cold, these take about 20 min on 2 cores)"
  bash "$repo/tools/controlplane/build.sh" >/dev/null
fi
echo "setup: done (venv $venv)"
