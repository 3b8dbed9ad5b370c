#!/usr/bin/env bash
# Boot the built lbappliance image under qemu the way a user would (a cloud-init NoCloud seed
# carrying config.yaml, pools.yaml and a kubeconfig) and check from inside that:
#   - haproxy.service, keepalived.service and lbappliance-keepalived-reload.path are active,
#   - lbappliance.service is active, or still starting with only "API unreachable" complaints
#     (the image has no cluster to reach: the kubeconfig points at 127.0.0.1:6443 in the guest),
#     with no tracebacks, no failed reconcile pass and no invalid-configuration exit,
#   - HAProxy and the daemon run as the unprivileged lbappliance user,
#   - net.ipv4.ip_nonlocal_bind, net.ipv6.ip_nonlocal_bind and both forwarding keys are 1,
#   - a keepalived.conf change made by the daemon reaches keepalived (path unit -> reload).
# The guest network is qemu user networking with restrict=on: nothing leaves the VM except
# the forwarded SSH port on 127.0.0.1. Prints the boot time and the accelerator used.
#
# Usage: scripts/image/boot-check.sh [IMAGE] [WORK_DIR]
#        (IMAGE default: $LBAPPLIANCE_IMAGE_DIR or ~/.cache/lbappliance/image, lbappliance.qcow2)
#        scripts/image/boot-check.sh --probe-accelerator IMAGE   (prints kvm or tcg)
# Environment: ACCELERATOR (kvm|tcg), WAIT_DAEMON_SECONDS (default 150), KEEP_VM=1 (leave it up).
set -euo pipefail

probe_accelerator() {
    # KVM counts only if a Linux guest really starts under it: some hosts expose a /dev/kvm
    # that runs the BIOS but hangs right after the boot sector. Boots a throwaway overlay of
    # IMAGE for up to PROBE_SECONDS and looks for the kernel banner on the serial console.
    local image=$1 dir
    if [ ! -w /dev/kvm ] || [ ! -f "$image" ]; then echo tcg; return; fi
    dir=$(mktemp -d)
    qemu-img create -q -f qcow2 -b "$(readlink -f "$image")" -F qcow2 "$dir/probe.qcow2"
    timeout "${PROBE_SECONDS:-60}" qemu-system-x86_64 -accel kvm -machine pc -m 512 \
        -drive "file=$dir/probe.qcow2,if=virtio,format=qcow2" -nic none -display none -monitor none \
        -serial "file:$dir/serial.log" >/dev/null 2>&1 &
    local pid=$! verdict=tcg
    for _ in $(seq "${PROBE_SECONDS:-60}"); do
        if grep -qa "Linux version" "$dir/serial.log" 2>/dev/null; then verdict=kvm; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    echo "$verdict"
}

if [ "${1:-}" = "--probe-accelerator" ]; then
    probe_accelerator "${2:?usage: boot-check.sh --probe-accelerator IMAGE}"
    exit 0
fi

IMAGE_DIR=${LBAPPLIANCE_IMAGE_DIR:-$HOME/.cache/lbappliance/image}
IMAGE=${1:-$IMAGE_DIR/lbappliance.qcow2}
WORK=${2:-$(mktemp -d "${TMPDIR:-/var/tmp}/lbappliance-boot.XXXXXX")}
WAIT_DAEMON=${WAIT_DAEMON_SECONDS:-150}
[ -f "$IMAGE" ] || { echo "boot-check.sh: no image at $IMAGE (run scripts/image/build-image.sh)" >&2; exit 1; }
ACCELERATOR=${ACCELERATOR:-$(probe_accelerator "$IMAGE")}
for tool in qemu-system-x86_64 qemu-img ssh ssh-keygen genisoimage; do
    command -v "$tool" >/dev/null || { echo "boot-check.sh: missing $tool (apt-get install qemu-system-x86 qemu-utils openssh-client genisoimage)" >&2; exit 1; }
done
mkdir -p "$WORK"
IMAGE=$(readlink -f "$IMAGE")

# ---- a throwaway overlay (the image stays pristine), key and first-boot seed
qemu-img create -q -f qcow2 -b "$IMAGE" -F qcow2 "$WORK/disk.qcow2" 8G
rm -f "$WORK/key" "$WORK/key.pub"
ssh-keygen -q -t ed25519 -N '' -C lbappliance-boot-check -f "$WORK/key"
mkdir -p "$WORK/seed"
cat > "$WORK/seed/user-data" <<EOF
#cloud-config
hostname: edge-check
ssh_authorized_keys:
  - $(cat "$WORK/key.pub")
write_files:
  - path: /etc/lbappliance/config.yaml
    owner: root:lbappliance
    permissions: "0640"
    content: |
      apiVersion: lbappliance.io/v1alpha1
      kind: ApplianceConfig
      name: edge-check
      processMode: external
      cluster:
        kubeconfig: /etc/lbappliance/kubeconfig
      vrrp:
        interface: ens3
        priority: 150
  - path: /etc/lbappliance/pools.yaml
    owner: root:lbappliance
    permissions: "0640"
    content: |
      apiVersion: lbappliance.io/v1alpha1
      kind: AddressPoolList
      pools:
      - name: default
        addresses: [192.0.2.200-192.0.2.250]
  - path: /etc/lbappliance/kubeconfig
    owner: root:lbappliance
    permissions: "0640"
    content: |
      apiVersion: v1
      kind: Config
      clusters:
      - name: none
        cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
      users:
      - name: lbappliance
        user: {token: no-cluster-in-the-boot-check}
      contexts:
      - name: lbappliance
        context: {cluster: none, user: lbappliance}
      current-context: lbappliance
EOF
printf 'instance-id: lbappliance-boot-check-%s\nlocal-hostname: edge-check\n' "$(date +%s)" > "$WORK/seed/meta-data"
genisoimage -quiet -output "$WORK/seed.iso" -volid cidata -joliet -rock "$WORK/seed/user-data" "$WORK/seed/meta-data"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SSH=(ssh -i "$WORK/key" -p "$PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
     -o LogLevel=ERROR -o ConnectTimeout=10 -o BatchMode=yes debian@127.0.0.1)

cleanup() {
    if [ "${KEEP_VM:-0}" != 1 ] && [ -f "$WORK/qemu.pid" ]; then
        kill "$(cat "$WORK/qemu.pid")" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap "exit 143" TERM INT   # run the EXIT cleanup (stop the daemonized qemu) when CI stops the tier

echo "==> booting $IMAGE (accelerator $ACCELERATOR, ssh on 127.0.0.1:$PORT, serial log $WORK/serial.log)"
t0=$(date +%s)
qemu-system-x86_64 -accel "$ACCELERATOR" -machine pc -smp 2 -m 1536 \
    -drive "file=$WORK/disk.qcow2,if=virtio,format=qcow2" \
    -drive "file=$WORK/seed.iso,media=cdrom,readonly=on" \
    -nic "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-:22" \
    -display none -serial "file:$WORK/serial.log" -monitor none \
    -daemonize -pidfile "$WORK/qemu.pid"

if [ "$ACCELERATOR" = kvm ]; then deadline=$((t0 + 300)); else deadline=$((t0 + 1200)); fi
until "${SSH[@]}" true 2>/dev/null; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
        echo "boot-check: no SSH within $((deadline - t0))s; serial console tail:" >&2
        tail -40 "$WORK/serial.log" >&2
        exit 1
    fi
    sleep 5
done
t_ssh=$(date +%s)
state=$("${SSH[@]}" "timeout 600 systemctl is-system-running --wait" || true)
t_boot=$(date +%s)
echo "==> SSH after $((t_ssh - t0))s; boot finished (is-system-running: $state) after $((t_boot - t0))s"

# ---- the checks, inside the guest
set +e
"${SSH[@]}" "sudo WAIT_DAEMON=$WAIT_DAEMON bash -s" <<'CHECK' | tee "$WORK/checks.txt"
set -u
fail=0
ok()  { echo "CHECK ok   $*"; }
bad() { echo "CHECK FAIL $*"; fail=1; }
for unit in haproxy.service lbappliance-keepalived-reload.path; do
    s=$(systemctl is-active "$unit")
    [ "$s" = active ] && ok "$unit active" || bad "$unit $s"
done
for key in net.ipv4.ip_nonlocal_bind net.ipv6.ip_nonlocal_bind net.ipv4.ip_forward net.ipv6.conf.all.forwarding; do
    v=$(sysctl -n "$key")
    [ "$v" = 1 ] && ok "$key=$v" || bad "$key=$v"
done
hp=$(systemctl show -p MainPID --value haproxy.service)
u=$(ps -o user= -p "$hp")
[ "$u" = lbappliance ] && ok "haproxy master runs as $u" || bad "haproxy master runs as $u"
for f in /etc/lbappliance/config.yaml /etc/lbappliance/pools.yaml /etc/lbappliance/kubeconfig; do
    [ -s "$f" ] && ok "cloud-init wrote $f ($(stat -c '%U:%G %a' "$f"))" || bad "$f missing"
done

# lbappliance: active, or still waiting for the (absent) cluster and nothing else.
end=$((SECONDS + WAIT_DAEMON))
while [ $SECONDS -lt $end ]; do
    s=$(systemctl show -p ActiveState --value lbappliance.service)
    [ "$s" = active ] || [ "$s" = failed ] && break
    sleep 5
done
s=$(systemctl show -p ActiveState --value lbappliance.service)
sub=$(systemctl show -p SubState --value lbappliance.service)
restarts=$(systemctl show -p NRestarts --value lbappliance.service)
journal=$(journalctl -b -u lbappliance.service --no-pager -o cat)
dp=$(systemctl show -p MainPID --value lbappliance.service)
[ "$dp" != 0 ] && du=$(ps -o user= -p "$dp") || du="(not running)"
# keepalived starts once the daemon has rendered keepalived.conf and asked for it.
ks=$(systemctl is-active keepalived.service)
if [ "$ks" = active ]; then
    ok "keepalived.service active ($(grep -c '^vrrp_instance' /etc/keepalived/keepalived.conf) VRRP instances rendered by the daemon)"
elif [ ! -s /etc/keepalived/keepalived.conf ]; then
    bad "keepalived.service $ks: the daemon never wrote /etc/keepalived/keepalived.conf"
else
    bad "keepalived.service $ks with a rendered keepalived.conf"
fi
# keepalived loads root's admitted copy, its scripts run as the daemon's user (issue 14, item 3).
if [ "$ks" = active ]; then
    admitted=/run/lbappliance-keepalived/keepalived.conf
    cmp -s "$admitted" /etc/keepalived/keepalived.conf && ok "keepalived loads root's admitted copy $admitted" \
        || bad "$admitted differs from the daemon's keepalived.conf (or is missing)"
    grep -q '^    script_user lbappliance$' "$admitted" && ok "scripts run as lbappliance (script_user)" \
        || bad "script_user is not lbappliance"
    end=$((SECONDS + 30))
    while [ $SECONDS -lt $end ] && ! ls /run/lbappliance/vrrp-*.state >/dev/null 2>&1; do sleep 1; done
    owners=$(stat -c %U /run/lbappliance/vrrp-*.state 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$owners" = "lbappliance " ] && ok "VRRP state files written by the notify hook as lbappliance" \
        || bad "VRRP state files owned by: ${owners:-none}"
fi
echo "lbappliance.service: $s/$sub, restarts $restarts, daemon user $du"
# A config.yaml change (SIGHUP, what ExecReload sends) re-renders keepalived.conf; the
# unprivileged daemon's request must reach the root keepalived as an in-place reload (same
# pid) through lbappliance-keepalived-reload.path.
if [ "$ks" = active ]; then
    kpid=$(systemctl show -p MainPID --value keepalived.service)
    before=$(journalctl -b -u keepalived.service -o cat | grep -c "Reload complete" || true)
    sed -i 's/priority: 150/priority: 140/' /etc/lbappliance/config.yaml
    systemctl kill --kill-who=main -s HUP lbappliance.service
    reloaded=no
    for _ in $(seq 60); do
        after=$(journalctl -b -u keepalived.service -o cat | grep -c "Reload complete" || true)
        if grep -q "priority 140" /etc/keepalived/keepalived.conf && [ "$after" -gt "$before" ]; then
            reloaded=yes; break
        fi
        sleep 2
    done
    kpid2=$(systemctl show -p MainPID --value keepalived.service)
    if [ "$reloaded" = yes ] && [ "$kpid" = "$kpid2" ]; then
        ok "config change reached keepalived as a reload through the path unit (pid $kpid kept)"
    else
        bad "config change: reloaded=$reloaded, keepalived pid $kpid -> $kpid2"
        journalctl -b -u keepalived.service -u lbappliance-keepalived-reload.service -o cat --no-pager | tail -15
    fi
fi
waiting=$(grep -c "API unreachable" <<<"$journal" || true)
# Any ERROR line counts: the daemon's "apply failed" once passed here as "waiting for the cluster".
problems=$(grep -E "Traceback|reconcile pass failed|invalid configuration|Error|error:| ERROR | CRITICAL " <<<"$journal" | grep -v "API unreachable" || true)
if [ "$s" = active ] && [ -z "$problems" ]; then
    ok "lbappliance.service active (READY=1 sent; $waiting 'API unreachable' lines: serving what is known)"
elif [ "$s" = activating ] && [ "$waiting" -gt 0 ] && [ -z "$problems" ]; then
    ok "lbappliance.service waiting for cluster access ($waiting 'API unreachable' lines, nothing else)"
else
    bad "lbappliance.service $s/$sub, restarts $restarts"
fi
[ "$du" = lbappliance ] && ok "daemon runs as lbappliance" || bad "daemon user: $du"
if [ -n "$problems" ]; then
    echo "--- problems in the lbappliance journal:"; echo "$problems" | head -40
fi
echo "--- lbappliance journal (last 25 lines):"; echo "$journal" | tail -25
echo "--- systemd-analyze security lbappliance.service: $(systemd-analyze security lbappliance.service | tail -1)"
echo "--- failed units: $(systemctl list-units --failed --no-legend --plain | awk '{print $1}' | xargs)"
exit $fail
CHECK
rc=${PIPESTATUS[0]}
set -e
t_end=$(date +%s)
{
    echo "accelerator=$ACCELERATOR"
    echo "ssh_seconds=$((t_ssh - t0))"
    echo "boot_seconds=$((t_boot - t0))"
    echo "check_seconds=$((t_end - t_boot))"
    echo "result=$([ "$rc" = 0 ] && echo pass || echo FAIL)"
} | tee "$WORK/boot-times.txt"
[ "${KEEP_VM:-0}" = 1 ] || "${SSH[@]}" "sudo systemctl poweroff" >/dev/null 2>&1 || true
exit "$rc"
