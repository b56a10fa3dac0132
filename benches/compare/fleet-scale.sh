#!/usr/bin/env bash
# The controller at fleet scale, before and after watch-fed caches, side by side: a real
# etcd and kube-apiserver (built from Go modules by tests/k8s/build-binaries.sh), M
# appliance processes in Kubernetes mode, N Servers spread over them (registrations over
# each appliance's HTTP API, as agents send them). Per N and binary: apiserver requests
# per minute per appliance at steady state (the apiserver's audit log, one user per
# appliance), KiB read per minute per appliance, resident memory per appliance (and per
# Server it holds), the time from a registration to its Server being visible, from a
# MetalMachine apply to its server claimed, and from 50 applied at once to all claimed.
# Loopback only, bounded.
# Usage: benches/compare/fleet-scale.sh [N,N,...] [M] [STEADY_SECS]
#   (BEFORE=rev, default the last commit before the caches; or ARGES_BEFORE_BIN and
#   ARGES_BIN: binaries built already; ARGES_K8S_BIN: the control plane's binaries)
source "$(dirname "$0")/lib.sh"
sizes="${1:-100,1000,5000}"; appliances="${2:-10}"; steady="${3:-60}"
need python3; need openssl; need ss iproute2; need git
k8s="${ARGES_K8S_BIN:-$(bash "$repo/tests/k8s/build-binaries.sh")}"
build_before "${BEFORE:-1811977}"
build_arges
python3 "$repo/benches/compare/fleet_scale.py" --before "$work/arges-before" --now "$arges" \
  --k8s "$k8s" --crds "$repo/deploy/crds/arges.yaml" --n "$sizes" --m "$appliances" \
  --steady "$steady"
