#!/usr/bin/env bash
# Build a Debian 12 (bookworm) cloud-style base image, qcow2, from Debian packages only.
#
# What it is: BIOS/MBR disk, one ext4 root partition, Debian's linux-image-amd64, GRUB on
# the serial console and the VGA console, systemd, openssh-server, cloud-init (NoCloud,
# ConfigDrive, OpenStack, VMware, None) with ifupdown/DHCP networking, growpart. No users,
# no passwords, no SSH keys: access comes from cloud-init user-data, as with Debian's own
# cloud images. This is the input of packer/lbappliance.pkr.hcl.
#
# Needs root (loop device, mount, chroot) and: mmdebstrap qemu-utils fdisk e2fsprogs.
# Usage: sudo scripts/image/build-base.sh [OUT_DIR]
#   OUT_DIR (default $LBAPPLIANCE_IMAGE_DIR or ~/.cache/lbappliance/image) receives
#   debian-12-base.qcow2 and debian-12-base.qcow2.sha256.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
#   DEBIAN_SECURITY_MIRROR (default http://deb.debian.org/debian-security), BASE_SIZE (4G).
set -euo pipefail

OUT_DIR=${1:-${LBAPPLIANCE_IMAGE_DIR:-$HOME/.cache/lbappliance/image}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SIZE=${BASE_SIZE:-4G}
SUITE=bookworm
NAME=debian-12-base

[ "$(id -u)" -eq 0 ] || { echo "build-base.sh: needs root (loop device, mount, chroot)" >&2; exit 1; }
for tool in mmdebstrap qemu-img sfdisk losetup mkfs.ext4 blkid; do
    command -v "$tool" >/dev/null || { echo "build-base.sh: missing $tool (apt-get install mmdebstrap qemu-utils fdisk e2fsprogs)" >&2; exit 1; }
done

# Mount only inside a private mount namespace. Anything that makes a namespace meanwhile (the
# test suite's `ip netns exec` copies the whole mount table) would otherwise keep a copy of the
# image's filesystem mounted after we unmount it, and e2fsck would refuse the partition.
if [ -z "${LBAPPLIANCE_PRIVATE_MOUNTS:-}" ]; then
    exec env LBAPPLIANCE_PRIVATE_MOUNTS=1 unshare --mount --propagation private "$0" "$@"
fi

mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/lbappliance-base.XXXXXX")
MNT=$WORK/root
LOOP=""
cleanup() {
    set +e
    for m in dev/pts dev proc sys run; do mountpoint -q "$MNT/$m" && umount "$MNT/$m"; done
    mountpoint -q "$MNT" && umount "$MNT"
    [ -n "$LOOP" ] && losetup -d "$LOOP"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 143" TERM INT

start=$(date +%s)
echo "==> disk: $SIZE raw, MBR, one bootable ext4 partition"
truncate -s "$SIZE" "$WORK/disk.raw"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$WORK/disk.raw"
LOOP=$(losetup --show -f -P "$WORK/disk.raw")
PART=${LOOP}p1
for _ in $(seq 20); do [ -b "$PART" ] && break; sleep 0.1; done
# Some kernels/containers do not scan the loop device's partitions on attach: ask explicitly.
[ -b "$PART" ] || partx -a "$LOOP" 2>/dev/null || true
for _ in $(seq 50); do [ -b "$PART" ] && break; sleep 0.1; done
[ -b "$PART" ] || { echo "build-base.sh: $PART did not appear" >&2; exit 1; }
mkfs.ext4 -q -L root "$PART"
UUID=$(blkid -s UUID -o value "$PART")
mkdir -p "$MNT"
mount "$PART" "$MNT"
rmdir "$MNT/lost+found"

echo "==> mmdebstrap $SUITE from $MIRROR"
PACKAGES=(
    systemd-sysv udev dbus kmod linux-image-amd64 initramfs-tools grub-pc
    openssh-server cloud-init cloud-guest-utils ifupdown isc-dhcp-client
    ca-certificates netbase iproute2 iputils-ping procps less sudo e2fsprogs
    qemu-guest-agent systemd-timesyncd
)
# grub-pc: no install device is known inside the build; the MBR is written below.
mmdebstrap --variant=apt --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --essential-hook='echo "grub-pc grub-pc/install_devices multiselect" | chroot "$1" debconf-set-selections; echo "grub-pc grub-pc/install_devices_empty boolean true" | chroot "$1" debconf-set-selections' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$MNT" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"

echo "==> system configuration"
cat > "$MNT/etc/fstab" <<EOF
UUID=$UUID / ext4 errors=remount-ro 0 1
EOF
echo debian > "$MNT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$MNT/etc/hosts"
cat > "$MNT/etc/network/interfaces" <<'EOF'
# cloud-init writes the interface configuration to /etc/network/interfaces.d/.
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOF
mkdir -p "$MNT/etc/network/interfaces.d"
cat > "$MNT/etc/cloud/cloud.cfg.d/90-lbappliance-datasources.cfg" <<'EOF'
# Local sources first (NoCloud seed ISO / SMBIOS, config drive), then the common clouds.
datasource_list: [NoCloud, ConfigDrive, OpenStack, VMware, None]
# No locales package in the image: C.UTF-8 is built into glibc (cloud-init's default,
# en_US.UTF-8, would fail in update-locale).
locale: C.UTF-8
# The instance's hostname resolves (sudo looks it up) once cloud-init has set it.
manage_etc_hosts: true
EOF
cat > "$MNT/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 net.ifnames=1"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
# No machine identity in a base image; systemd creates one on first boot.
: > "$MNT/etc/machine-id"
rm -f "$MNT/var/lib/dbus/machine-id" "$MNT"/etc/ssh/ssh_host_*
# cloud-init regenerates host keys per instance; this keeps sshd starting even without it.
mkdir -p "$MNT/etc/systemd/system/ssh.service.d"
cat > "$MNT/etc/systemd/system/ssh.service.d/host-keys.conf" <<'EOF'
[Service]
ExecStartPre=/usr/bin/ssh-keygen -A
EOF
passwd -R "$MNT" -l root >/dev/null

echo "==> bootloader (GRUB, BIOS) on $LOOP"
for m in dev dev/pts proc sys run; do mkdir -p "$MNT/$m"; done
mount --bind /dev "$MNT/dev"
mount --bind /dev/pts "$MNT/dev/pts"
mount -t proc proc "$MNT/proc"
mount -t sysfs sysfs "$MNT/sys"
mount -t tmpfs tmpfs "$MNT/run"
chroot "$MNT" grub-install --target=i386-pc --modules="part_msdos ext2" "$LOOP"
chroot "$MNT" update-grub
# update-grub names the root by UUID; make sure no loop device path leaked into the config.
if grep -q "/dev/loop" "$MNT/boot/grub/grub.cfg"; then
    sed -i "s|root=/dev/loop[0-9]*p1|root=UUID=$UUID|g" "$MNT/boot/grub/grub.cfg"
fi
grep -q "root=UUID=$UUID" "$MNT/boot/grub/grub.cfg" || { echo "grub.cfg does not boot root=UUID=$UUID" >&2; exit 1; }

echo "==> cleanup"
chroot "$MNT" apt-get clean
rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/var/log/*.log "$MNT"/var/cache/debconf/*-old "$MNT"/tmp/* "$MNT"/var/tmp/*
for m in run sys proc dev/pts dev; do umount "$MNT/$m"; done
fstrim "$MNT" 2>/dev/null || true
umount "$MNT"
e2fsck -fy "$PART" >/dev/null || [ $? -le 1 ]
losetup -d "$LOOP"
LOOP=""

echo "==> qcow2"
qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$OUT_DIR/$NAME.qcow2.tmp"
mv "$OUT_DIR/$NAME.qcow2.tmp" "$OUT_DIR/$NAME.qcow2"
(cd "$OUT_DIR" && sha256sum "$NAME.qcow2" > "$NAME.qcow2.sha256")
echo "==> $OUT_DIR/$NAME.qcow2 ($(du -h "$OUT_DIR/$NAME.qcow2" | cut -f1), sha256 $(cut -d' ' -f1 "$OUT_DIR/$NAME.qcow2.sha256"))"
echo "==> base image built in $(( $(date +%s) - start ))s"
