#!/usr/bin/env bash
# The image slow tier: install the image tools, build the VM image (base image from Debian
# packages, cached; then packer validate + packer build of this checkout) and boot it under qemu
# with the inside checks. `.ci/run` starts it in the background beside `make test`, at idle CPU
# priority, and fails when it fails.
#
# Usage: sudo scripts/image/slow-tier.sh            (everything)
#        sudo scripts/image/slow-tier.sh --install  (only the Debian packages it needs)
# Output goes to $LBAPPLIANCE_IMAGE_DIR (default ~/.cache/lbappliance/image); times are in
# build-times.txt and boot/boot-times.txt there.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=${LBAPPLIANCE_IMAGE_DIR:-$HOME/.cache/lbappliance/image}
TOOLS=(packer qemu-system-x86 qemu-utils mmdebstrap fdisk e2fsprogs genisoimage openssh-client python3-pip
       util-linux)

install_tools() {
    local missing=() pkg
    for pkg in "${TOOLS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || { echo "slow-tier: need root to install ${missing[*]}" >&2; exit 1; }
    echo "slow-tier: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_tools
[ "${1:-}" = "--install" ] && exit 0

mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/boot"
t0=$(date +%s)
echo "==> slow tier: build the image ($(date -u +%H:%M:%S))"
"$REPO/scripts/image/build-image.sh" "$OUT_DIR"
t1=$(date +%s)
echo "==> slow tier: boot it and check from inside ($(date -u +%H:%M:%S))"
"$REPO/scripts/image/boot-check.sh" "$OUT_DIR/lbappliance.qcow2" "$OUT_DIR/boot"
t2=$(date +%s)
echo "==> slow tier passed: build $((t1 - t0))s, boot and checks $((t2 - t1))s"
cat "$OUT_DIR/build-times.txt" "$OUT_DIR/boot/boot-times.txt"
