#!/usr/bin/env bash
# Writes a clusterctl repository, as clusterctl reads a local one (<folder>/<provider>/
# <version>/<file>), holding every provider `clusterctl init --infrastructure arges
# --bootstrap talos` installs, at the releases the tests use (deploy/versions.env), made
# from their own Go modules: Cluster API core (core/config/default) and CABPT
# (config/default) built with kubectl's kustomize, their release images named (pulled only
# if not present: the tests' node imports them and reaches no registry), with their
# metadata.yaml; Arges from deploy/clusterctl; cert-manager's manifest from
# tests/k8s/build-binaries.sh. And clusterctl.yaml, the config naming them all.
#
# Usage: tests/k8s/clusterctl-repository.sh K8S_BIN OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:?the folder of tests/k8s/build-binaries.sh}"
out="${2:?an output folder}"
# shellcheck source=../../deploy/versions.env
. deploy/versions.env
# shellcheck source=../../deploy/go-modules.sh
. deploy/go-modules.sh
export GOFLAGS="-mod=mod"

# provider LABEL VERSION FILE MODULE_DIR CONFIG METADATA IMAGE
provider() {
  local to="$out/$1/$2"
  mkdir -p "$to"
  # The manager's image, whatever registry and tag the project's config names.
  local name="${7%:*}"
  name="${name##*/}"
  "$bin/kubectl" kustomize "$4/$5" 2>/dev/null |
    sed -e "s#image: .*/$name:.*#image: $7#" -e "s#image: controller:latest#image: $7#" \
      -e "s#imagePullPolicy: Always#imagePullPolicy: IfNotPresent#" > "$to/$3"
  grep -q "image: $7" "$to/$3" || { echo "error: $1: no manager image to set in $4/$5" >&2; exit 1; }
  cp "$4/$6" "$to/metadata.yaml"
}

capi="$(module_dir sigs.k8s.io/cluster-api "$CAPI_VERSION")"
cabpt="$(GONOSUMDB=github.com/siderolabs module_dir github.com/siderolabs/cluster-api-bootstrap-provider-talos "$CABPT_VERSION")"
provider cluster-api "$CAPI_VERSION" core-components.yaml "$capi" core/config/default metadata.yaml "$CAPI_IMAGE"
provider bootstrap-talos "$CABPT_VERSION" bootstrap-components.yaml "$cabpt" config/default \
  config/metadata/metadata.yaml "$CABPT_IMAGE"
mkdir -p "$out/infrastructure-arges/v0.1.0" "$out/cert-manager/$CERT_MANAGER_VERSION"
cp deploy/clusterctl/*.yaml "$out/infrastructure-arges/v0.1.0/"
cp "$bin/cert-manager/cert-manager.yaml" "$out/cert-manager/$CERT_MANAGER_VERSION/"

cat > "$out/clusterctl.yaml" <<EOF
providers:
  - name: cluster-api
    type: CoreProvider
    url: $out/cluster-api/$CAPI_VERSION/core-components.yaml
  - name: talos
    type: BootstrapProvider
    url: $out/bootstrap-talos/$CABPT_VERSION/bootstrap-components.yaml
  - name: arges
    type: InfrastructureProvider
    url: $out/infrastructure-arges/v0.1.0/infrastructure-components.yaml
cert-manager:
  url: $out/cert-manager/$CERT_MANAGER_VERSION/cert-manager.yaml
  version: $CERT_MANAGER_VERSION
CLUSTERCTL_DISABLE_VERSIONCHECK: "true"
EOF
echo "$out/clusterctl.yaml"
