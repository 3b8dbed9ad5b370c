#!/usr/bin/env bash
# Build the lbappliance VM image: base image (built locally if missing) -> wheelhouse ->
# throwaway build key + build-time cloud-init seed -> packer validate -> packer build.
#
# Usage: sudo scripts/image/build-image.sh [OUT_DIR]
#   OUT_DIR (default $LBAPPLIANCE_IMAGE_DIR or ~/.cache/lbappliance/image) receives
#   lbappliance.qcow2 (+ .sha256) and the logs; the base image is cached there too.
# Environment:
#   BASE_IMAGE / BASE_IMAGE_CHECKSUM  use this base (path or URL; "sha256:.." / "file:.." / none)
#                                     instead of building OUT_DIR/debian-12-base.qcow2
#   ACCELERATOR                       kvm or tcg (default: kvm if a KVM guest really runs here)
#   PYTHON                            interpreter that builds the wheels; must match the image's
#                                     Python 3.11 (default /usr/bin/python3 on Debian 12)
#   PACKER                            packer binary (default: packer on PATH; Debian's 1.6.6 works)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=${1:-${LBAPPLIANCE_IMAGE_DIR:-$HOME/.cache/lbappliance/image}}
PYTHON=${PYTHON:-/usr/bin/python3}
PACKER=${PACKER:-packer}
export CHECKPOINT_DISABLE=1   # no version check calls to HashiCorp
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

t0=$(date +%s)
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=$OUT_DIR/debian-12-base.qcow2
    if [ ! -f "$BASE_IMAGE" ]; then
        "$REPO/scripts/image/build-base.sh" "$OUT_DIR"
    fi
    BASE_IMAGE_CHECKSUM="sha256:$(cut -d' ' -f1 "$BASE_IMAGE.sha256")"
fi
BASE_IMAGE_CHECKSUM=${BASE_IMAGE_CHECKSUM:-none}
t_base=$(date +%s)

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/lbappliance-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 143' TERM INT

echo "==> wheelhouse (lbappliance + dependencies from PyPI) with $($PYTHON -V 2>&1)"
"$PYTHON" -m pip wheel --quiet "$REPO" -w "$WORK/wheels"
ls "$WORK/wheels"

echo "==> throwaway build key and build-time cloud-init seed"
ssh-keygen -q -t ed25519 -N '' -C lbappliance-packer-build -f "$WORK/build_key"
mkdir -p "$WORK/seed"
cat > "$WORK/seed/user-data" <<EOF
#cloud-config
# Build time only: root login with the throwaway key; removed before the image is sealed.
disable_root: false
users: []
ssh_pwauth: false
ssh_authorized_keys:
  - $(cat "$WORK/build_key.pub")
EOF
printf 'instance-id: lbappliance-build-%s\nlocal-hostname: lbappliance-build\n' "$(date +%s)" > "$WORK/seed/meta-data"

if [ -z "${ACCELERATOR:-}" ]; then
    ACCELERATOR=$("$REPO/scripts/image/boot-check.sh" --probe-accelerator "$BASE_IMAGE")
fi
echo "==> accelerator: $ACCELERATOR"

VARS=(
    -var "base_image=$BASE_IMAGE"
    -var "base_image_checksum=$BASE_IMAGE_CHECKSUM"
    -var "wheelhouse=$WORK/wheels"
    -var "ssh_private_key_file=$WORK/build_key"
    -var "build_seed_dir=$WORK/seed"
    -var "repo_dir=$REPO"
    -var "output_directory=$WORK/output"
    -var "accelerator=$ACCELERATOR"
    -var "serial_log=$OUT_DIR/packer-serial.log"
)
[ "$ACCELERATOR" = tcg ] && VARS+=(-var "ssh_timeout=60m")

echo "==> $PACKER validate ($($PACKER version | head -1))"
"$PACKER" validate "${VARS[@]}" "$REPO/packer/lbappliance.pkr.hcl"

echo "==> $PACKER build"
t_build=$(date +%s)
PACKER_LOG=1 PACKER_LOG_PATH="$OUT_DIR/packer.log" \
    "$PACKER" build -color=false -force "${VARS[@]}" "$REPO/packer/lbappliance.pkr.hcl" | tee "$OUT_DIR/packer-build.out"
t_done=$(date +%s)

mv "$WORK/output/lbappliance.qcow2" "$OUT_DIR/lbappliance.qcow2"
(cd "$OUT_DIR" && sha256sum lbappliance.qcow2 > lbappliance.qcow2.sha256)
{
    echo "accelerator=$ACCELERATOR"
    echo "base_seconds=$((t_base - t0))"
    echo "packer_build_seconds=$((t_done - t_build))"
    echo "total_seconds=$((t_done - t0))"
} > "$OUT_DIR/build-times.txt"
echo "==> $OUT_DIR/lbappliance.qcow2 ($(du -h "$OUT_DIR/lbappliance.qcow2" | cut -f1))"
echo "==> times: base $((t_base - t0))s (0 = cached), packer build $((t_done - t_build))s, total $((t_done - t0))s, accelerator $ACCELERATOR"
