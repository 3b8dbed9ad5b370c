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
# The units as installed.
# --man=no: the image carries no man pages (dpkg path-exclude), which verify would look up.
systemd-analyze verify --man=no lbappliance.service lbappliance-keepalived-reload.path lbappliance-keepalived-reload.service \
    haproxy.service keepalived.service
systemd-analyze security lbappliance.service | tail -1
