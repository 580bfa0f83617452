#!/usr/bin/env bash
# Builds the benchmark peer, Flux's notification-controller (its Receiver API is a
# token-addressed webhook receiver for Kubernetes), from the pinned wrapper module in
# tools/peer, caches the binary under the home directory keyed by the pins, and links it
# into target/tools/bin. Only `make peer-tools` and `make bench` call this, never
# `make tools`: the peer is measured, never shipped. A second run only relinks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
cache_root=${HOOKRUN_TOOLS_CACHE:-$HOME/.cache/hookrun/tools}
bin_dir=$root/target/tools/bin
mkdir -p "$bin_dir"

module=github.com/fluxcd/notification-controller
version=$(awk -v m="$module" '$1 == "require" && $2 == m {print $3}' "$root/tools/peer/go.mod")
key=$(cat "$root/tools/peer/go.mod" "$root/tools/peer/go.sum" | sha256sum | cut -c1-16)
out=$cache_root/notification-controller-$version-$key-$(go env GOVERSION)

if [ -f "$out/.complete" ]; then
  echo "peer-tools: notification-controller $version cached in $out"
else
  echo "peer-tools: $(date +%H:%M:%S) building notification-controller $version into $out"
  echo "peer-tools: a cold build takes about 5 minutes on 2 cores; later runs reuse it"
  mkdir -p "$out/crd"
  (
    cd "$root/tools/peer"
    go mod download "$module"
    go build -trimpath -ldflags "-s -w" -o "$out/notification-controller" "$module"
    # Its CRDs (Receiver, and Alert and Provider, which it also watches) ship in the module.
    src=$(go list -m -f '{{.Dir}}' "$module")
    cp "$src"/config/crd/bases/*.yaml "$out/crd/"
    chmod u+w "$out"/crd/*.yaml
  )
  touch "$out/.complete"
  echo "peer-tools: $(date +%H:%M:%S) notification-controller done"
fi
ln -sf "$out/notification-controller" "$bin_dir/notification-controller"
ln -sfn "$out/crd" "$bin_dir/notification-controller-crd"
echo "peer-tools: ready in $bin_dir (notification-controller $version)"
