#!/bin/sh
# Debian's haproxy and keepalived, and python3-venv for the daemon's own venv.
set -eux

# The daemon owns /etc/haproxy/haproxy.cfg and /etc/keepalived/keepalived.conf: keep them
# (never prompt, never replace) when haproxy or keepalived are upgraded.
cat > /etc/apt/apt.conf.d/90lbappliance <<'CONF'
Dpkg::Options { "--force-confdef"; "--force-confold"; };
CONF

if [ -n "${DEBIAN_MIRROR:-}" ] && [ "$DEBIAN_MIRROR" != "http://deb.debian.org/debian" ]; then
    sed -i "s|http://deb.debian.org/debian |$DEBIAN_MIRROR |" /etc/apt/sources.list
fi
# cloud-init's default locale (en_US.UTF-8) is not generated in a minimal image; C.UTF-8 is.
# The instance hostname must resolve (sudo looks it up). build-base.sh sets both too;
# repeated here for other Debian 12 cloud base images.
printf 'locale: C.UTF-8\nmanage_etc_hosts: true\n' > /etc/cloud/cloud.cfg.d/91-lbappliance.cfg
apt-get update
apt-get install -y --no-install-recommends haproxy keepalived python3-venv openssl  # openssl: enroll's key
# frr, frr-pythontools: bgpd, bfdd, zebra, vtysh and frr-reload.py for announce.mode: bgp (off
# until a box is configured for it: docs/install.md, "BGP mode").
apt-get install -y --no-install-recommends frr frr-pythontools
systemctl disable --now frr.service || true
haproxy -v | head -1
keepalived --version 2>&1 | head -1
