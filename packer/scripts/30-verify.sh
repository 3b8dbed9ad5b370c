#!/bin/sh
# Checks inside the build VM, before cleanup: the privilege design works on a real systemd.
set -eux

# The path unit is pulled in by lbappliance.service (Wants=), which does not run in the build.
systemctl start lbappliance-keepalived-reload.path
for unit in haproxy.service lbappliance-keepalived-reload.path; do
    # one unit per call: `systemctl is-active a b` succeeds when any of them is active
    systemctl is-active "$unit" || {
        systemctl status --no-pager "$unit" || true
        journalctl --no-pager -n 50 -u "$unit"
        exit 1
    }
done
# HAProxy runs unprivileged, as the daemon's user.
pid=$(systemctl show -p MainPID --value haproxy.service)
test "$(ps -o user= -p "$pid")" = lbappliance
# Both sysctls are set.
test "$(sysctl -n net.ipv4.ip_nonlocal_bind)" = 1
test "$(sysctl -n net.ipv6.ip_nonlocal_bind)" = 1
# The daemon's user reaches the master CLI and the runtime API (no root).
runuser -u lbappliance -- /opt/lbappliance/venv/bin/python3 - <<'PY'
from lbappliance.edges.haproxy import HAProxy
h = HAProxy("/etc/haproxy/haproxy.cfg", "/run/lbappliance/haproxy-master.sock", "/run/lbappliance/haproxy.sock",
            "/run/lbappliance/haproxy.pid")
table = h.show_proc()
assert table.workers, table
result = h.reload()
assert result.ok, result
assert "Name: HAProxy" in h.runtime("show info")
print("master CLI reload as lbappliance:", result)
PY
# The daemon's user asks for a keepalived reload through the path unit: the root oneshot
# consumes the request and runs reload-or-restart (keepalived itself stays skipped here:
# there is no keepalived.conf until the daemon renders one).
runuser -u lbappliance -- touch /run/lbappliance/keepalived.reload
for _ in $(seq 100); do [ ! -e /run/lbappliance/keepalived.reload ] && break; sleep 0.1; done
test ! -e /run/lbappliance/keepalived.reload
sleep 2
journalctl -u lbappliance-keepalived-reload.service --no-pager -o cat | grep -q "Finished"
test "$(systemctl show -p ConditionResult --value keepalived.service)" = no
# A user that is not lbappliance cannot ask.
if runuser -u nobody -- touch /run/lbappliance/keepalived.reload 2>/dev/null; then
    echo "nobody could request a keepalived reload" >&2
    exit 1
fi
# Root's admission check of the daemon's keepalived.conf (keepalived.service ExecStartPre and
# ExecReload): a rendered config is admitted, one that runs scripts as root is refused.
ADMIT_DIR=$(mktemp -d)
cat > "$ADMIT_DIR/config.yaml" <<'CONF'
processMode: external
vrrp: {interface: lo, unicastSrcIp: 192.0.2.2, unicastPeers: [192.0.2.3]}
CONF
/opt/lbappliance/venv/bin/python3 - "$ADMIT_DIR" <<'PY'
import sys
from pathlib import Path
from lbappliance.core.config import parse_config
from lbappliance.core.plan import Snapshot, desired_state
from lbappliance.core.render import render_keepalived
d = Path(sys.argv[1])
config = parse_config((d / "config.yaml").read_text())
_, state = desired_state(Snapshot((), (), (), config))
text = render_keepalived(state, config)
(d / "good.conf").write_text(text)
(d / "bad.conf").write_text(text.replace("script_user lbappliance", "script_user root"))
PY
/opt/lbappliance/venv/bin/python3 -I -m lbappliance.edges.keepalived admit "$ADMIT_DIR/good.conf" "$ADMIT_DIR/admitted.conf"
if /opt/lbappliance/venv/bin/python3 -I -m lbappliance.edges.keepalived admit "$ADMIT_DIR/bad.conf" "$ADMIT_DIR/admitted.conf"; then
    echo "root's admission check let script_user root through" >&2
    exit 1
fi
grep -q "script_user lbappliance" "$ADMIT_DIR/admitted.conf"
rm -rf "$ADMIT_DIR"
systemctl cat keepalived.service | grep -q "lbappliance.edges.keepalived admit"
# The units as installed.
# --man=no: the image carries no man pages (dpkg path-exclude), which verify would look up.
systemd-analyze verify --man=no lbappliance.service lbappliance-keepalived-reload.path lbappliance-keepalived-reload.service \
    haproxy.service keepalived.service
for unit in lbappliance.service haproxy.service keepalived.service lbappliance-keepalived-reload.service; do
    systemd-analyze security "$unit" | tail -1
done
