#!/usr/bin/env bash
# From a laptop to a cluster in one command (`make deploy`):
#   1. builds the three images as `make images` does (cheap when nothing changed),
#   2. pushes them with crane to $REGISTRY/hookrun-{operator,apiserver,harness}:<version>,
#   3. `helm upgrade --install`s charts/hookrun with global.imageRegistry=$REGISTRY and
#      each image pinned by the digest the registry answered, publicURL=$PUBLIC_URL,
#      plus $HELM_ARGS,
#   4. prints what it pushed and how to get the first Agent's URL.
# helm and kubectl-style access use KUBECONFIG (or ~/.kube/config) as usual.
#
#   REGISTRY     (required) registry and path the cluster pulls from, e.g.
#                ghcr.io/my-org or registry.example.com:5000/team
#   PUBLIC_URL   (required) the public base of webhook URLs, e.g. https://hooks.example.com
#   RELEASE      Helm release name (default hookrun)
#   NAMESPACE    namespace of the release (default hookrun-system; created if missing)
#   HELM_ARGS    more helm arguments, split on spaces, e.g. "--set apiserver.replicas=3"
#   INSECURE=1   plain HTTP to the registry; without it only a registry on localhost or
#                a loopback address is spoken to over plain HTTP
#   SKIP_BUILD=1 push the tarballs already in target/images/ without building
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
crane=$root/target/tools/bin/crane
helm=$root/target/tools/bin/helm

usage() {
  cat >&2 <<'USAGE'
usage: make deploy REGISTRY=<registry/path> PUBLIC_URL=<https://...> [RELEASE=hookrun]
                   [NAMESPACE=hookrun-system] [HELM_ARGS="--set key=value ..."] [INSECURE=1]
e.g.   make deploy REGISTRY=ghcr.io/my-org PUBLIC_URL=https://hooks.example.com
USAGE
}
die() { echo "deploy: $*" >&2; exit 1; }

registry=${REGISTRY:-}
registry=${registry%/}
public_url=${PUBLIC_URL:-}
release=${RELEASE:-hookrun}
namespace=${NAMESPACE:-hookrun-system}
[ -n "$registry" ] || { usage; die "REGISTRY is required: where the cluster can pull the images from"; }
[ -n "$public_url" ] || { usage; die "PUBLIC_URL is required: the public base of every webhook URL"; }
case "$registry" in
  *://*) die "REGISTRY=$registry: give the registry and path without a scheme (e.g. ghcr.io/my-org)" ;;
  *[[:space:]@]*) die "REGISTRY=$registry must not contain spaces or @" ;;
esac
case "$public_url" in
  http://*|https://*) ;;
  *) die "PUBLIC_URL=$public_url must be an absolute http:// or https:// URL" ;;
esac
[ -x "$crane" ] || die "$crane is missing; run make tools"
[ -x "$helm" ] || die "$helm is missing; run make tools"

# Plain HTTP only for a registry on this machine, or when asked.
host=${registry%%/*}
crane_flags=()
case "$host" in
  localhost|localhost:*|127.*|\[::1\]|\[::1\]:*) crane_flags+=(--insecure) ;;
  *) [ "${INSECURE:-}" = 1 ] && crane_flags+=(--insecure) ;;
esac

version=$(awk -F'"' '/^\[workspace.package\]/ {p=1} p && /^version/ {print $2; exit}' Cargo.toml)
if [ "${SKIP_BUILD:-}" != 1 ]; then
  images/build.sh
fi

names=(hookrun-operator hookrun-apiserver hookrun-harness)
declare -A digests
for name in "${names[@]}"; do
  tarball=target/images/$name.tar
  [ -f "$tarball" ] || die "$tarball is missing; run make images"
  ref=$registry/$name:$version
  echo "deploy: pushing $tarball to $ref"
  # crane prints the pushed image as <repository>@sha256:<digest>.
  pushed=$("$crane" push "${crane_flags[@]}" "$tarball" "$ref" | tail -n 1)
  digest=${pushed##*@}
  [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || die "crane push $ref answered $pushed, not a digest"
  digests[$name]=$digest
done

helm_args=(
  upgrade --install "$release" charts/hookrun
  --namespace "$namespace" --create-namespace
  --set-string "publicURL=$public_url"
  --set-string "global.imageRegistry=$registry"
  --set-string "operator.image.digest=${digests[hookrun-operator]}"
  --set-string "apiserver.image.digest=${digests[hookrun-apiserver]}"
  --set-string "harness.image.digest=${digests[hookrun-harness]}"
)
read -r -a extra <<<"${HELM_ARGS:-}"
echo "deploy: helm ${helm_args[*]} ${extra[*]}"
"$helm" "${helm_args[@]}" "${extra[@]}"

# The chart names its objects <release>-hookrun-..., or <release>-... when the release
# name already says hookrun.
case "$release" in
  *hookrun*) fullname=$release ;;
  *) fullname=$release-hookrun ;;
esac
echo
echo "deploy: pushed (the release runs these digests):"
for name in "${names[@]}"; do
  echo "  $registry/$name@${digests[$name]}   ($name:$version)"
done
cat <<EOF

The first Agent's URL:
  kubectl -n $namespace rollout status deploy/$fullname-operator deploy/$fullname-apiserver
  kubectl apply -n default -f examples/echo-agent.yaml
  kubectl wait -n default agent/echo --for=condition=Ready --timeout=60s
  kubectl get agent -n default echo -o jsonpath='{.status.webhookUrl}'
Then: curl -sS -H 'content-type: application/json' -d '{"title":"hello","wait":60}' <that URL>
(\`helm status $release -n $namespace\` shows more: a model-backed Agent, exposing $public_url.)
EOF
