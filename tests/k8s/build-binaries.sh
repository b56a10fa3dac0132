#!/usr/bin/env bash
# Builds the Kubernetes test binaries from Go modules at pinned releases (never downloads
# prebuilt ones): kube-apiserver and kubectl from k8s.io/kubernetes, etcd, and the Cluster
# API controllers the provider tests run beside Arges: the core manager
# (sigs.k8s.io/cluster-api) and the Talos bootstrap provider (CABPT), with the CRDs from
# those same modules; and a node for the tests that run pods: kubelet,
# kube-controller-manager and kube-scheduler from the same Kubernetes release, containerd
# (with its runc shim and ctr) from its Go module, and the pause container's static binary
# from the Kubernetes source. runc and the CNI plugins come from Debian (tests/run-all.sh). They are cached outside the work tree, under
# $ARGES_CACHE/k8s/<versions>/bin, and reused while the pins stay the same. The providers
# live in bin/capi-<versions>/ ({cluster-api,cabpt} and crds/), which bin/capi links to;
# clusterctl, from the same Cluster API release, is bin/clusterctl-<version>, linked as
# bin/clusterctl. promtool (Prometheus's rule checker, for deploy/observability) is
# bin/promtool-<version>, linked as bin/promtool.
# Prints the bin folder.
#
# k8s.io/kubernetes requires its ~30 staging modules (k8s.io/api, k8s.io/apiserver, …) at
# v0.0.0 and replaces them with its own staging/ folder, which a module download lacks: a
# scratch module replaces each with its published v0.<minor>.<patch> release instead.
set -euo pipefail
K8S_VERSION="${ARGES_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ARGES_ETCD_VERSION:-v3.6.14}"
# shellcheck source=../../deploy/versions.env
. "$(dirname "$0")/../../deploy/versions.env"
# shellcheck source=../../deploy/go-modules.sh
. "$(dirname "$0")/../../deploy/go-modules.sh"
CAPI_VERSION="${ARGES_CAPI_VERSION:-$CAPI_VERSION}"
CABPT_VERSION="${ARGES_CABPT_VERSION:-$CABPT_VERSION}"
CONTAINERD_VERSION="${ARGES_CONTAINERD_VERSION:-v2.2.9}"
cache="${ARGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arges}"
out="$cache/k8s/kubernetes-$K8S_VERSION-etcd-$ETCD_VERSION/bin"
# Static (CGO_ENABLED=0), as their release images build them: the same binaries run as
# test processes and inside the images deploy/build-images.sh makes.
providers="$out/capi-$CAPI_VERSION-cabpt-$CABPT_VERSION-static"
runtime="$out/containerd-$CONTAINERD_VERSION"
clusterctl="$out/clusterctl-$CAPI_VERSION"
cert_manager="$out/cert-manager-$CERT_MANAGER_VERSION"
# Prometheus's Go module versions are v0.<major*100+minor>.<patch>: v0.316.0 is 3.16.0.
PROMETHEUS_VERSION="${ARGES_PROMETHEUS_VERSION:-v0.316.0}"
promtool="$out/promtool-$PROMETHEUS_VERSION"

have_control_plane() { [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/etcd" ]; }
have_providers() { [ -x "$providers/cluster-api" ] && [ -x "$providers/cabpt" ] && [ -f "$providers/crds/.complete" ]; }
have_clusterctl() { [ -x "$clusterctl" ]; }
have_promtool() { [ -x "$promtool" ]; }
have_cert_manager() {
  [ -x "$cert_manager/controller" ] && [ -x "$cert_manager/cainjector" ] && [ -x "$cert_manager/webhook" ] &&
    [ -f "$cert_manager/cert-manager.yaml" ]
}
have_node() {
  [ -x "$out/kubelet" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/kube-scheduler" ] &&
    [ -x "$out/pause" ] && [ -x "$runtime/containerd" ] && [ -x "$runtime/ctr" ] &&
    [ -x "$runtime/containerd-shim-runc-v2" ]
}
link_versions() {
  ln -sfn "$(basename "$providers")" "$out/capi"
  ln -sfn "$(basename "$runtime")" "$out/containerd"
  ln -sfn "$(basename "$clusterctl")" "$out/clusterctl"
  ln -sfn "$(basename "$cert_manager")" "$out/cert-manager"
  ln -sfn "$(basename "$promtool")" "$out/promtool"
}
if have_control_plane && have_providers && have_node && have_clusterctl && have_cert_manager &&
  have_promtool; then
  link_versions
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "error: go is needed to build the test control plane" >&2; exit 1; }
mkdir -p "$out"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { echo "[control plane] $*" >&2; }

# A module's own source tree (read-only in the module cache), copied to build as the main
# module, so its go.sum and replace directives apply as in the release.
module_tree() {
  local dir
  dir="$(module_dir "$1" "$2")"
  mkdir -p "$work/src"
  cp -r "$dir" "$work/src/$3"
  chmod -R u+w "$work/src/$3"
  echo "$work/src/$3"
}

build_providers() {
  rm -rf "$providers"
  mkdir -p "$providers/crds"
  # The Cluster API core manager. Its go.mod replaces the api module by ./api, which the
  # module download leaves out: the published api module at the same release stands in.
  local capi
  capi="$(module_tree sigs.k8s.io/cluster-api "$CAPI_VERSION" cluster-api)"
  (cd "$capi" &&
    go mod edit -dropreplace=sigs.k8s.io/cluster-api/api -require="sigs.k8s.io/cluster-api/api@$CAPI_VERSION" &&
    log "building the Cluster API core manager $CAPI_VERSION (the first build takes several minutes)" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$providers/cluster-api.partial" ./core &&
    cp core/config/crd/bases/*.yaml "$providers/crds/")
  mv "$providers/cluster-api.partial" "$providers/cluster-api"
  # The Talos bootstrap provider. Its checksum database lookup answers 404, so its own
  # module is not checked against sum.golang.org (its dependencies still are, by go.sum).
  local cabpt
  cabpt="$(GONOSUMDB=github.com/siderolabs module_tree github.com/siderolabs/cluster-api-bootstrap-provider-talos "$CABPT_VERSION" cabpt)"
  (cd "$cabpt" &&
    log "building the Talos bootstrap provider $CABPT_VERSION" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$providers/cabpt.partial" . &&
    cp config/crd/bases/*.yaml "$providers/crds/")
  mv "$providers/cabpt.partial" "$providers/cabpt"
  touch "$providers/crds/.complete"
}

# clusterctl, from the Cluster API module tree as the core manager (its api module the
# published one).
build_clusterctl() {
  local capi
  capi="$(module_tree sigs.k8s.io/cluster-api "$CAPI_VERSION" clusterctl)"
  (cd "$capi" &&
    go mod edit -dropreplace=sigs.k8s.io/cluster-api/api -require="sigs.k8s.io/cluster-api/api@$CAPI_VERSION" &&
    log "building clusterctl $CAPI_VERSION" &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cluster-api/version.gitVersion=$CAPI_VERSION" \
      -o "$clusterctl.partial" ./cmd/clusterctl)
  mv "$clusterctl.partial" "$clusterctl"
}

# cert-manager's controller, cainjector and webhook (static), from a scratch module that
# requires its release with the release's own replace directives, and its manifest: its
# chart from the module, rendered by helm (built from its module) with its CRDs.
build_cert_manager() {
  local dir src
  rm -rf "$cert_manager"
  mkdir -p "$cert_manager" "$work/cert-manager"
  src="$(module_dir github.com/cert-manager/cert-manager "$CERT_MANAGER_VERSION")"
  [ -d "$src" ] || exit 1
  dir="$work/cert-manager"
  (cd "$dir" &&
    go mod init arges.test/cert-manager >/dev/null 2>&1 &&
    go mod edit -require="github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" &&
    # The release's replace directives (one per line, or in a block), as old=new.
    for r in $(awk '/^replace \($/ {b=1; next} b && /^\)/ {b=0; next}
        /^replace / {sub(/^replace /, ""); print; next} b {print}' "$src/go.mod" |
        awk -F' => ' '{split($1, o, " "); split($2, n, " ");
          printf "%s%s=%s%s\n", o[1], (o[2] ? "@" o[2] : ""), n[1], (n[2] ? "@" n[2] : "")}'); do
      go mod edit -replace="$r"
    done &&
    log "building cert-manager $CERT_MANAGER_VERSION (controller, cainjector, webhook)" &&
    for c in controller cainjector webhook; do
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$CERT_MANAGER_VERSION" \
        -o "$cert_manager/$c" "github.com/cert-manager/cert-manager/cmd/$c" || exit 1
    done)
  log "building helm $HELM_VERSION (to render cert-manager's chart)"
  GOBIN="$work/helm" CGO_ENABLED=0 go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  local chart="$work/cert-manager-chart"
  cp -r "$src/deploy/charts/cert-manager" "$chart"
  chmod -R u+w "$chart"
  sed -e "s/^version: .*/version: $CERT_MANAGER_VERSION/" -e "s/^appVersion: .*/appVersion: $CERT_MANAGER_VERSION/" \
    -e 's/{{IS_PRERELEASE}}/false/' "$chart/Chart.template.yaml" > "$chart/Chart.yaml"
  rm "$chart/Chart.template.yaml"
  cp "$src"/deploy/crds/crd-*.yaml "$chart/templates/"
  { printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: cert-manager\n---\n'
    "$work/helm/helm" template cert-manager "$chart" --namespace cert-manager \
      --set installCRDs=true --set startupapicheck.enabled=false \
      --set image.repository="$CERT_MANAGER_REGISTRY/cert-manager-controller" \
      --set cainjector.image.repository="$CERT_MANAGER_REGISTRY/cert-manager-cainjector" \
      --set webhook.image.repository="$CERT_MANAGER_REGISTRY/cert-manager-webhook"
  } > "$cert_manager/cert-manager.yaml.partial"
  mv "$cert_manager/cert-manager.yaml.partial" "$cert_manager/cert-manager.yaml"
}

# A scratch module that requires k8s.io/kubernetes with its staging modules resolved, in
# $work/kube; sets $ldflags for its commands.
kube_module() {
[ -f "$work/kube/go.mod" ] && return
minor="${K8S_VERSION#v1.}"            # 35.4
staging_version="v0.${minor}"         # v0.35.4
mkdir -p "$work/kube"
cd "$work/kube"
go mod init arges.test/kube >/dev/null 2>&1
log "resolving k8s.io/kubernetes@$K8S_VERSION"
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
[ -f "$gomod" ] || { echo "error: cannot download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
# Every staging module it pins at v0.0.0 gets its published release.
for m in $(sed -n 's/^[[:space:]]*\(k8s\.io\/[a-z0-9-]*\) v0\.0\.0$/\1/p' "$gomod" | sort -u); do
  go mod edit -replace="$m=$m@$staging_version"
done
# Its go and godebug lines keep the build's behaviour the release's.
go_line="$(sed -n 's/^go \(.*\)$/\1/p' "$gomod" | head -n1)"
[ -n "$go_line" ] && go mod edit -go="$go_line"
sed -n '/^godebug/,/^)/p' "$gomod" >> go.mod
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor%%.*} -X $pkg.gitTreeState=clean"
}

kube_commands() {
  kube_module
  local cmd
  for cmd in "$@"; do
    log "building $cmd $K8S_VERSION (the first build takes several minutes)"
    (cd "$work/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/$cmd.partial" "k8s.io/kubernetes/cmd/$cmd")
    mv "$out/$cmd.partial" "$out/$cmd"
  done
}

build_control_plane() {
kube_commands kube-apiserver kubectl

# etcd.
mkdir -p "$work/etcd"
cd "$work/etcd"
go mod init arges.test/etcd >/dev/null 2>&1
log "building etcd $ETCD_VERSION"
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
go build -trimpath -ldflags "-s -w" -o "$out/etcd.partial" go.etcd.io/etcd/server/v3
mv "$out/etcd.partial" "$out/etcd"

"$out/kube-apiserver" --version >&2
}

# The node: kubelet and its two controllers, the pause container, containerd.
build_node() {
  kube_commands kubelet kube-controller-manager kube-scheduler
  # The pause container is one static C file in the Kubernetes source, as its release
  # image builds it.
  local src
  src="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  command -v gcc >/dev/null || { echo "error: gcc is needed to build the pause container" >&2; exit 1; }
  log "building the pause container"
  local pause_tag
  pause_tag="$(sed -n 's/^TAG ?= //p' "$src/build/pause/Makefile")"
  gcc -Os -Wall -Werror -static "-DVERSION=v$pause_tag-$K8S_VERSION" -o "$out/pause.partial" "$src/build/pause/linux/pause.c"
  strip "$out/pause.partial"
  mv "$out/pause.partial" "$out/pause"
  # containerd v2 (kubelet 1.35 needs 2.1.5 or newer; Debian's is 1.6). Without btrfs
  # snapshotter headers; the shim static, as containerd's release builds it.
  local cd_tree
  cd_tree="$(module_tree github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" containerd)"
  rm -rf "$runtime"
  mkdir -p "$runtime"
  local cd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  (cd "$cd_tree" &&
    log "building containerd $CONTAINERD_VERSION" &&
    go build -trimpath -tags no_btrfs,urfave_cli_no_docs -ldflags "$cd_ldflags" -o "$runtime/containerd" ./cmd/containerd &&
    go build -trimpath -tags no_btrfs,urfave_cli_no_docs -ldflags "$cd_ldflags" -o "$runtime/ctr" ./cmd/ctr &&
    CGO_ENABLED=0 go build -trimpath -tags urfave_cli_no_docs -ldflags "$cd_ldflags" -o "$runtime/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2)
}

# promtool, from the Prometheus module (its cmd/promtool; go install takes the module's
# own go.mod, which has no replace directive).
build_promtool() {
  log "building promtool $PROMETHEUS_VERSION"
  local bin="$work/promtool"
  GOBIN="$bin" CGO_ENABLED=0 go install -trimpath \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  mv "$bin/promtool" "$promtool"
}

have_control_plane || build_control_plane
have_providers || build_providers
have_clusterctl || build_clusterctl
have_cert_manager || build_cert_manager
have_promtool || build_promtool
have_node || build_node
link_versions
echo "$out"
