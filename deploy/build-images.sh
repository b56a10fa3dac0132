#!/usr/bin/env bash
# Builds the appliance image without a container engine or daemon: a static `arges`
# (every feature), the shipped BMC plugins, Debian's iPXE boot binaries (package `ipxe`)
# and the CA bundle, written by deploy/image (go-containerregistry) as a docker-archive
# tarball that `ctr images import`, `podman load` and `docker load` read. Prints the
# tarball's path. deploy/Containerfile builds the same image with a container engine.
# Usage: deploy/build-images.sh [OUT_DIR]   (ARGES_IMAGE: the tag, default the one
# deploy/mgmt expects)
set -euo pipefail
cd "$(dirname "$0")/.."
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
(cd deploy/image && go build -o "$out/image" .)

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
