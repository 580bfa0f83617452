#!/usr/bin/env bash
# Builds hookrun's container images without a container daemon (`make images`):
#   1. static release binaries (glibc with crt-static; nothing to load at run time),
#   2. one layer per image: the binary in /usr/local/bin plus the CA bundle,
#   3. crane appends that layer to an empty base in a throwaway in-memory registry on
#      127.0.0.1, sets entrypoint, user 65532:65532, platform and OCI labels, and saves
#      the image as a tarball (docker/podman `load`, `kind load image-archive`,
#      `crane push`).
# Output: target/images/<name>.tar, tagged $IMAGE_REGISTRY/<name>:<version>.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
crane=$root/target/tools/bin/crane
[ -x "$crane" ] || { echo "images: $crane is missing; run make tools" >&2; exit 1; }

registry_prefix=${IMAGE_REGISTRY:-ghcr.io/hookrun}
version=$(awk -F'"' '/^\[workspace.package\]/ {p=1} p && /^version/ {print $2; exit}' Cargo.toml)
source_url=$(awk -F'"' '/^\[workspace.package\]/ {p=1} p && /^repository/ {print $2; exit}' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
target=x86_64-unknown-linux-gnu
# A target directory of its own: these artifacts share nothing with the debug build,
# and a long `cargo test` elsewhere holding target/'s lock must not block this one.
build_dir=${CARGO_TARGET_DIR:-$root/target}/static
out=$root/target/images
mkdir -p "$out"

# name:package pairs; the harness joins once its crate exists.
images=(hookrun-operator:hookrun-operator hookrun-apiserver:hookrun-apiserver)
if [ -f harness/Cargo.toml ] && grep -q '"harness"' Cargo.toml; then
  harness_package=$(awk -F'"' '/^name/ {print $2; exit}' harness/Cargo.toml)
  images+=("hookrun-harness:$harness_package")
fi

packages=()
for pair in "${images[@]}"; do packages+=(-p "${pair#*:}"); done
echo "images: $(date +%H:%M:%S) cargo build --release --target $target (static) ${packages[*]}"
# --target keeps crt-static away from build scripts and proc macros, which must stay
# dynamic; the binaries link glibc statically (the tree uses rustls, no OpenSSL).
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  nice cargo build --release --locked --target "$target" --target-dir "$build_dir" "${packages[@]}"

registry_log=$(mktemp)
"$crane" registry serve --address 127.0.0.1:0 >"$registry_log" 2>&1 &
registry_pid=$!
trap 'kill "$registry_pid" 2>/dev/null || true; rm -rf "$registry_log" "${crane_log:-}" "${layer_dir:-}"' EXIT
port=
for _ in $(seq 1 50); do
  port=$(sed -n 's/.*serving on port \([0-9]*\).*/\1/p' "$registry_log" | head -1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { echo "images: crane registry did not start:" >&2; cat "$registry_log" >&2; exit 1; }
scratch=127.0.0.1:$port
crane_log=$(mktemp)
quiet() { "$@" >"$crane_log" 2>&1 || { cat "$crane_log" >&2; exit 1; }; }

for pair in "${images[@]}"; do
  name=${pair%%:*}
  binary=$build_dir/$target/release/$name
  if ! file "$binary" | grep -Eq 'statically linked|static-pie linked'; then
    echo "images: $binary is not statically linked:" >&2
    file "$binary" >&2
    exit 1
  fi
  layer_dir=$(mktemp -d)
  install -D -m 0755 "$binary" "$layer_dir/rootfs/usr/local/bin/$name"
  # Symbols stay in target/ for debugging; the image carries none.
  strip --strip-all "$layer_dir/rootfs/usr/local/bin/$name"
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$layer_dir/rootfs/etc/ssl/certs/ca-certificates.crt"
  install -d -m 1777 "$layer_dir/rootfs/tmp"
  # A reproducible layer: sorted, owned by root, one fixed mtime.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$layer_dir/rootfs" -cf "$layer_dir/layer.tar" .
  quiet "$crane" append --oci-empty-base -f "$layer_dir/layer.tar" -t "$scratch/$name:build"
  quiet "$crane" mutate "$scratch/$name:build" \
    --entrypoint "/usr/local/bin/$name" \
    --user 65532:65532 \
    --workdir / \
    --set-platform linux/amd64 \
    -e SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    -l "org.opencontainers.image.title=$name" \
    -l "org.opencontainers.image.version=$version" \
    -l "org.opencontainers.image.revision=$revision" \
    -l "org.opencontainers.image.source=$source_url" \
    -l "org.opencontainers.image.licenses=Apache-2.0" \
    -t "$registry_prefix/$name:$version" \
    -o "$out/$name.tar"
  rm -rf "$layer_dir"
  echo "images: $out/$name.tar ($registry_prefix/$name:$version, $(du -h "$out/$name.tar" | cut -f1))"
done
echo "images: $(date +%H:%M:%S) done"
