#!/usr/bin/env bash
# Builds the appliance image without a container engine or daemon: a static `arges`
# (every feature), the shipped BMC plugins, Debian's iPXE boot binaries (package `ipxe`)
# and the CA bundle, written by deploy/tools/image (go-containerregistry) as a
# docker-archive tarball that `ctr images import`, `podman load`, `docker load` and
# `skopeo copy docker-archive:…` read. deploy/Containerfile builds the same image with a
# container engine.
#
# With --test-images K8S_BIN it also makes, from the binaries tests/k8s/build-binaries.sh
# built into K8S_BIN, the images the tests' node runs under the names the manifests use:
# Cluster API core, CABPT and the pause container (deploy/versions.env). Prints each
# tarball's path, one per line.
#
# Usage: deploy/build-images.sh [--test-images K8S_BIN] [OUT_DIR]
#   (ARGES_IMAGE: the appliance's tag, default the one deploy/mgmt expects)
set -euo pipefail
cd "$(dirname "$0")/.."
test_bin=""
if [ "${1:-}" = --test-images ]; then
  test_bin="${2:?--test-images needs the folder of tests/k8s/build-binaries.sh}"
  shift 2
fi
# shellcheck source=versions.env
. deploy/versions.env
out="${1:-${CARGO_TARGET_DIR:-target}/images}"
tag="${ARGES_IMAGE:-arges-appliance:0.1.0}"
target_dir="${CARGO_TARGET_DIR:-target}"
out="$(mkdir -p "$out" && cd "$out" && pwd)"
for f in undionly.kpxe undionly.kkpxe ipxe.efi snponly.efi ipxe.pxe; do
  [ -e "/usr/lib/ipxe/$f" ] || { echo "error: /usr/lib/ipxe/$f is missing (apt-get install ipxe)" >&2; exit 1; }
done
[ -e /etc/ssl/certs/ca-certificates.crt ] || { echo "error: no CA bundle (apt-get install ca-certificates)" >&2; exit 1; }
command -v go >/dev/null || { echo "error: go is needed to build deploy/image" >&2; exit 1; }

triple="$(rustc -vV | sed -n 's/^host: //p')"
echo "==> static arges ($triple)" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$triple" --bin arges >&2
bin="$target_dir/arges-appliance-static"
strip -o "$bin" "$target_dir/$triple/release/arges" 2>/dev/null || cp "$target_dir/$triple/release/arges" "$bin"
if ! ldd "$bin" 2>&1 | grep -qE "not a dynamic executable|statically linked"; then
  echo "error: $bin is not static:" >&2; ldd "$bin" >&2; exit 1
fi
echo "==> plugins" >&2
bash plugins/build.sh >&2
echo "==> image writer" >&2
(cd deploy/tools && go build -o "$out/image" ./image)

adds=(--add "$bin:/usr/local/bin/arges"
      --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt)
for f in undionly.kpxe undionly.kkpxe ipxe.efi snponly.efi ipxe.pxe; do
  adds+=(--add "/usr/lib/ipxe/$f:/usr/lib/ipxe/$f")
done
for p in ipmi supermicro redfish; do
  adds+=(--add "plugins/out/$p.wasm:/usr/lib/arges/plugins/$p.wasm")
done
echo "==> $tag" >&2
"$out/image" --tag "$tag" --out "$out/arges-appliance.tar" "${adds[@]}" \
  --entrypoint /usr/local/bin/arges --cmd run >&2
echo "$out/arges-appliance.tar"

[ -n "$test_bin" ] || exit 0
# The providers' release images hold their static manager as /manager and run it as
# 65532 (distroless's nonroot), which their manifests expect.
for b in capi/cluster-api capi/cabpt pause cert-manager/controller cert-manager/cainjector cert-manager/webhook; do
  [ -x "$test_bin/$b" ] || { echo "error: $test_bin/$b is missing: run tests/k8s/build-binaries.sh" >&2; exit 1; }
done
echo "==> $CAPI_IMAGE, $CABPT_IMAGE, $PAUSE_IMAGE" >&2
"$out/image" --tag "$CAPI_IMAGE" --out "$out/cluster-api.tar" --add "$test_bin/capi/cluster-api:/manager" \
  --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
  --entrypoint /manager --user 65532:65532 >&2
"$out/image" --tag "$CABPT_IMAGE" --out "$out/cabpt.tar" --add "$test_bin/capi/cabpt:/manager" \
  --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
  --entrypoint /manager --user 65532:65532 >&2
"$out/image" --tag "$PAUSE_IMAGE" --out "$out/pause.tar" --add "$test_bin/pause:/pause" \
  --entrypoint /pause --user 65535:65535 >&2
# cert-manager's three, as its release images: the binary as their entrypoint, run as
# non-root (its chart asks for runAsNonRoot).
for c in controller cainjector webhook; do
  "$out/image" --tag "$CERT_MANAGER_REGISTRY/cert-manager-$c:$CERT_MANAGER_VERSION" \
    --out "$out/cert-manager-$c.tar" --add "$test_bin/cert-manager/$c:/app/cmd/$c/$c" \
    --add /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
    --entrypoint "/app/cmd/$c/$c" --user 1000:1000 >&2
done
printf '%s\n' "$out/cluster-api.tar" "$out/cabpt.tar" "$out/pause.tar" \
  "$out"/cert-manager-{controller,cainjector,webhook}.tar
