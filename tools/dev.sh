#!/usr/bin/env bash
# make dev: builds what is needed (the control plane tools, then hookrun's binaries) with
# progress lines, then runs hookrun-dev in the foreground until Ctrl-C.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo=${CARGO:-cargo}
began=$(date +%s)

# The first build is long and quiet (go build prints nothing while it works): say so
# every 30 s. The ticker is stopped by its pid.
elapsed() { local s=$(( $(date +%s) - began )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
ticker() {
  while sleep 30; do
    echo "dev: still building, $(elapsed) so far (a first build takes about 10 minutes on 2 cores; later runs take seconds)"
  done
}
ticker &
ticker_pid=$!
trap 'kill "$ticker_pid" 2>/dev/null || true' EXIT

echo "dev: step 1/3: the control plane tools (etcd, kube-apiserver, kube-controller-manager, kubectl)"
tools/build.sh
echo "dev: step 2/3: hookrun's binaries (cargo build --bins)"
"$cargo" build --bins
kill "$ticker_pid" 2>/dev/null || true
trap - EXIT
echo "dev: step 3/3: starting hookrun (built in $(elapsed))"
exec target/debug/hookrun-dev "$@"
