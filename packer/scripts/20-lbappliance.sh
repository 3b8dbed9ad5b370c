#!/bin/sh
# The lbappliance wheel in /opt/lbappliance/venv, its units, user, directories and sysctls,
# and bootstrap haproxy.cfg/keepalived.conf (no Services yet) so both units start at boot.
set -eux
SRC=/tmp/lbappliance
UNITDIR=/usr/local/lib/systemd/system

# ---- the daemon: the wheel and its dependencies, all from the uploaded wheelhouse
python3 -m venv /opt/lbappliance/venv
/opt/lbappliance/venv/bin/pip install --no-index --find-links "$SRC/wheels" --no-cache-dir lbappliance
ln -sf /opt/lbappliance/venv/bin/lbappliance /usr/local/bin/lbappliance
/opt/lbappliance/venv/bin/lbappliance --version

# ---- user, directories, sysctls, units (the locally-installed-software paths systemd searches)
install -D -m 0644 "$SRC/systemd/lbappliance.sysusers.conf" /usr/local/lib/sysusers.d/lbappliance.conf
install -D -m 0644 "$SRC/systemd/lbappliance.tmpfiles.conf" /usr/local/lib/tmpfiles.d/lbappliance.conf
install -D -m 0644 "$SRC/systemd/99-lbappliance.conf" /usr/local/lib/sysctl.d/99-lbappliance.conf
install -D -m 0644 -t "$UNITDIR" "$SRC/systemd/lbappliance.service" \
    "$SRC/systemd/lbappliance-keepalived-reload.path" "$SRC/systemd/lbappliance-keepalived-reload.service"
install -D -m 0644 "$SRC/systemd/haproxy.service.d/lbappliance.conf" "$UNITDIR/haproxy.service.d/lbappliance.conf"
install -D -m 0644 "$SRC/systemd/keepalived.service.d/lbappliance.conf" "$UNITDIR/keepalived.service.d/lbappliance.conf"
systemd-sysusers /usr/local/lib/sysusers.d/lbappliance.conf
systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/lbappliance.conf
sysctl -p /usr/local/lib/sysctl.d/99-lbappliance.conf

# ---- examples for the first-boot configuration
install -D -m 0644 -t /usr/local/share/doc/lbappliance "$SRC/cloud-init/user-data.example"
# announce.mode: bgp, to switch on per box (docs/install.md): the daemon's drop-in, FRR's daemons
# file and the ARP sysctls
install -D -m 0644 -t /usr/local/share/doc/lbappliance/bgp "$SRC/systemd/lbappliance.service.d/bgp.conf.example" \
    "$SRC/systemd/frr-daemons.lbappliance" "$SRC/systemd/99-lbappliance-bgp.conf"

# ---- bootstrap haproxy.cfg, as the daemon renders it for no Services (external mode, default
# state dir), so haproxy.service starts under the drop-in before the daemon's first pass.
# No keepalived.conf: its VRRP instances name the appliance's interface, which only the
# first-boot config.yaml knows, and keepalived (Type=notify) never reports ready without
# instances. keepalived.service is skipped (ConditionFileNotEmpty) until the daemon writes
# the first keepalived.conf and asks for it through lbappliance-keepalived-reload.path
# (reload-or-restart starts it); from then on it starts at boot with the last rendered one.
BOOT=$(mktemp -d)
printf '' > "$BOOT/empty.yaml"
cat > "$BOOT/config.yaml" <<'CONF'
apiVersion: lbappliance.io/v1alpha1
kind: ApplianceConfig
processMode: external
CONF
cat > "$BOOT/pools.yaml" <<'CONF'
apiVersion: lbappliance.io/v1alpha1
kind: AddressPoolList
pools: []
CONF
lbappliance render --config "$BOOT/config.yaml" --pools "$BOOT/pools.yaml" \
    --services "$BOOT/empty.yaml" --nodes "$BOOT/empty.yaml" --out "$BOOT/out"
[ -f /etc/haproxy/haproxy.cfg ] && mv /etc/haproxy/haproxy.cfg /etc/haproxy/haproxy.cfg.debian
install -m 0644 -o lbappliance -g lbappliance "$BOOT/out/haproxy.cfg" /etc/haproxy/haproxy.cfg
rm -f /etc/keepalived/keepalived.conf
rm -rf "$BOOT"
haproxy -c -f /etc/haproxy/haproxy.cfg

# ---- enable: lbappliance.service pulls in haproxy, keepalived and the reload path unit
systemctl daemon-reload
systemctl enable lbappliance.service haproxy.service keepalived.service
systemctl restart haproxy.service
