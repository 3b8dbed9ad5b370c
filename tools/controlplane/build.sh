#!/usr/bin/env bash
# Build a real kube-apiserver, etcd and kube-proxy (test tooling only) from the
# Kubernetes Go modules pinned in this directory's go.mod/go.sum.
#
# Output: ${LBAPPLIANCE_CACHE:-$HOME/.cache/lbappliance}/controlplane/<hash>/bin/{kube-apiserver,etcd,kube-proxy}
# where <hash> is a short sha256 of go.mod, go.sum and the cmd/ sources, so a
# version bump builds into a fresh directory. Does nothing when all three binaries
# already exist. The last line on stdout is always the bin directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
export CGO_ENABLED=0

cache_root="${LBAPPLIANCE_CACHE:-$HOME/.cache/lbappliance}/controlplane"
hash="$(cat go.mod go.sum cmd/kube-apiserver/main.go cmd/etcd/main.go cmd/kube-proxy/main.go cmd/kube-controller-manager/main.go | sha256sum | cut -c1-16)"
out="$cache_root/$hash"
bin="$out/bin"

binaries=(kube-apiserver etcd kube-proxy kube-controller-manager)  # kcm: its CSR signer, for `enroll`
have_all() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if have_all; then
  echo "$bin"
  exit 0
fi

mkdir -p "$out"
# Serialise concurrent builds (tests and the lab command may race).
exec 9>"$out/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if have_all; then
  echo "$bin"
  exit 0
fi

# Versions come from go.mod so /version tells the truth.
kube_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' go.mod)"
if [[ -z "$kube_version" ]]; then
  echo "build.sh: cannot find k8s.io/kubernetes version in go.mod" >&2
  exit 1
fi
major="$(echo "$kube_version" | sed -E 's/^v([0-9]+)\.([0-9]+)\..*/\1/')"
minor="$(echo "$kube_version" | sed -E 's/^v([0-9]+)\.([0-9]+)\..*/\2/')"
build_date="$(date -u +'%Y-%m-%dT%H:%M:%SZ')"

ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version"
  ldflags+=" -X $pkg.gitMajor=$major"
  ldflags+=" -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
  ldflags+=" -X $pkg.buildDate=$build_date"
done

tmp="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "build.sh: building kube-apiserver and kube-proxy $kube_version and etcd $(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' go.mod) into $bin" >&2
# One go build: the three share most packages, so they compile once.
go build -trimpath -ldflags "$ldflags" -o "$tmp/" ./cmd/kube-apiserver ./cmd/etcd ./cmd/kube-proxy ./cmd/kube-controller-manager >&2

mkdir -p "$bin"
for b in "${binaries[@]}"; do
  mv -f "$tmp/$b" "$bin/$b"
done
echo "$bin"
