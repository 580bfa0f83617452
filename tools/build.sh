#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kubectl), helm (chart tests) and crane (`make images`) from the pinned Go wrapper
# modules in tools/, caches the binaries under the home directory keyed by the pinned
# versions, and links them into target/tools/bin. A second run with the same pins only relinks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
cache_root=${HOOKRUN_TOOLS_CACHE:-$HOME/.cache/hookrun/tools}
bin_dir=$root/target/tools/bin
mkdir -p "$bin_dir"

kube_version=$(awk '/^require k8s.io\/kubernetes/ {print $3}' "$root/tools/kube/go.mod")
etcd_version=$(awk '/go.etcd.io\/etcd\/server\/v3 / {print $NF; exit}' "$root/tools/etcd/go.mod")
helm_version=$(awk '/^require helm.sh\/helm\/v4/ {print $3}' "$root/tools/helm/go.mod")
crane_version=$(awk '/^require github.com\/google\/go-containerregistry/ {print $3}' "$root/tools/crane/go.mod")
go_version=$(go env GOVERSION)

# The cache key is the pinned module graph; the Go version is part of the directory name.
key_of() { cat "$@" | sha256sum | cut -c1-16; }

stamp() { date +%H:%M:%S; }

build_set() { # name, module dir, cache subdir, cold-build estimate, then "output=package" pairs
  local name=$1 dir=$2 out=$3 estimate=$4; shift 4
  if [ -f "$out/.complete" ]; then
    echo "tools: $name cached in $out"
    return
  fi
  echo "tools: $(stamp) building $name from Go modules into $out"
  echo "tools: a cold build of $name takes $estimate on 2 cores; later runs reuse it"
  mkdir -p "$out"
  local pair
  (
    cd "$dir"
    go mod download
    for pair in "$@"; do
      local exe=${pair%%=*} pkg=${pair#*=}
      echo "tools: $(stamp)   go build $pkg"
      go build -trimpath -ldflags "$LDFLAGS" -o "$out/$exe" "$pkg"
    done
  )
  touch "$out/.complete"
  echo "tools: $(stamp) $name done"
}

LDFLAGS="-s -w"
etcd_out=$cache_root/etcd-$etcd_version-$(key_of "$root/tools/etcd/go.mod" "$root/tools/etcd/go.sum")-$go_version
build_set "etcd $etcd_version" "$root/tools/etcd" "$etcd_out" "about 2 minutes" etcd=go.etcd.io/etcd/server/v3

minor=${kube_version#v1.}; minor=${minor%%.*}
LDFLAGS="-s -w \
 -X k8s.io/component-base/version.gitVersion=$kube_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$kube_version \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
kube_out=$cache_root/kube-$kube_version-$(key_of "$root/tools/kube/go.mod" "$root/tools/kube/go.sum")-$go_version
build_set "kubernetes $kube_version" "$root/tools/kube" "$kube_out" "10-20 minutes" \
  kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
  kubectl=k8s.io/kubernetes/cmd/kubectl

LDFLAGS="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
helm_out=$cache_root/helm-$helm_version-$(key_of "$root/tools/helm/go.mod" "$root/tools/helm/go.sum")-$go_version
build_set "helm $helm_version" "$root/tools/helm" "$helm_out" "about 3 minutes" helm=helm.sh/helm/v4/cmd/helm

LDFLAGS="-s -w -X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$crane_version"
crane_out=$cache_root/crane-$crane_version-$(key_of "$root/tools/crane/go.mod" "$root/tools/crane/go.sum")-$go_version
build_set "crane $crane_version" "$root/tools/crane" "$crane_out" "under a minute" crane=github.com/google/go-containerregistry/cmd/crane

ln -sf "$etcd_out/etcd" "$bin_dir/etcd"
for exe in kube-apiserver kube-controller-manager kubectl; do
  ln -sf "$kube_out/$exe" "$bin_dir/$exe"
done
ln -sf "$helm_out/helm" "$bin_dir/helm"
ln -sf "$crane_out/crane" "$bin_dir/crane"
echo "tools: ready in $bin_dir (kubernetes $kube_version, etcd $etcd_version, helm $helm_version, crane $crane_version)"
