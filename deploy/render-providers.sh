#!/usr/bin/env bash
# Renders the two Cluster API providers deploy/mgmt installs beside Arges, Cluster API
# core and the Talos bootstrap provider (CABPT), at the releases in deploy/versions.env,
# into deploy/mgmt/providers/: each project's own config/default from its Go module,
# built with kustomize, moved into the arges-system namespace, with the webhook
# certificates cert-manager would have made (deploy/tools/providers says exactly what
# changes). The folder holds private keys and is not committed; render it once per
# management cluster, before `kustomize build deploy/mgmt | kubectl apply -f -`.
#
# Usage: deploy/render-providers.sh [OUT_DIR]   (default deploy/mgmt/providers; KUBECTL:
# the kubectl whose embedded kustomize builds; ARGES_NAMESPACE: default arges-system)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
. deploy/versions.env
# shellcheck source=go-modules.sh
. deploy/go-modules.sh
namespace="${ARGES_NAMESPACE:-arges-system}"
kubectl="${KUBECTL:-kubectl}"
out="${1:-deploy/mgmt/providers}"
command -v go >/dev/null || { echo "error: go is needed (it downloads the providers' modules)" >&2; exit 1; }
command -v "$kubectl" >/dev/null || { echo "error: $kubectl not found (set KUBECTL)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd deploy/tools && go build -o "$work/providers" ./providers)


# render NAME MODULE VERSION CONFIG_DIR IMAGE
render() {
  local dir
  dir="$(module_dir "$2" "$3")"
  echo "==> $1: $2@$3/$4" >&2
  # kustomize warns about the deprecated fields some providers still use; the output is
  # what counts.
  "$kubectl" kustomize "$dir/$4" 2>"$work/$1.warnings" > "$work/$1.yaml" ||
    { cat "$work/$1.warnings" >&2; exit 1; }
  "$work/providers" --namespace "$namespace" --image "$5" --in "$work/$1.yaml" \
    --out "$work/$1.rendered.yaml" --source "$2@$3/$4"
}

render cluster-api sigs.k8s.io/cluster-api "$CAPI_VERSION" core/config/default "$CAPI_IMAGE"
# CABPT's checksum-database lookup answers 404: its module is checked by go.sum alone.
GONOSUMDB=github.com/siderolabs render cabpt github.com/siderolabs/cluster-api-bootstrap-provider-talos \
  "$CABPT_VERSION" config/default "$CABPT_IMAGE"

mkdir -p "$out"
chmod 700 "$out"
mv "$work/cluster-api.rendered.yaml" "$out/cluster-api.yaml"
mv "$work/cabpt.rendered.yaml" "$out/cabpt.yaml"
echo "$out"
