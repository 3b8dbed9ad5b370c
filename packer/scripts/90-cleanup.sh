#!/bin/sh
# Leave no build identity behind: machine-id, SSH host keys, cloud-init instance state, logs,
# apt caches, the uploaded files. The build SSH key is removed by the shutdown command.
set -eux
rm -rf /tmp/lbappliance /root/.cache
id debian >/dev/null 2>&1 && userdel -r debian || true
apt-get clean
rm -rf /var/lib/apt/lists/*
cloud-init clean --logs --seed
rm -f /etc/network/interfaces.d/50-cloud-init /etc/hostname.cloud-init
echo debian > /etc/hostname
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_* /var/lib/systemd/random-seed
journalctl --rotate || true
journalctl --vacuum-time=1s || true
rm -rf /var/log/journal/*
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history
fstrim -av || true
sync
