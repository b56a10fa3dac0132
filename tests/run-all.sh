#!/usr/bin/env bash
# The whole Arges test suite, on a fresh Debian machine: installs the peers the tests talk
# to, then runs formatting and lint checks, unit and integration tests, the benches in
# quick mode (so they keep compiling), and the static agent build.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Peers and tools from Debian: curl, tftp-hpa's tftp, atftp (TFTP clients), binutils (strip,
# objcopy), python3-venv (componentize-py builds the Python plugin), wrk (comparison
# scripts); for the network-boot tests: QEMU with the iPXE option ROMs, iPXE's binaries,
# OVMF, dnsmasq as the site's DHCP server, busybox-static and cpio for the initramfs,
# iproute2 for the namespaces; OpenIPMI's ipmi_sim and ipmitool for the BMC tests; runc,
# the CNI plugins and util-linux's nsenter and unshare for the tests' Kubernetes node;
# gcc for its pause container; chromium, its WebDriver and a font for the console's
# browser test.
packages=(curl tftp-hpa atftp binutils ca-certificates python3-venv wrk
  qemu-system-x86 ipxe-qemu ipxe ovmf dnsmasq-base busybox-static cpio gzip iproute2
  openipmi ipmitool runc containernetworking-plugins util-linux gcc libc6-dev
  chromium chromium-driver fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Node.js and npm install componentize-js (the JavaScript plugin and starter).
if ! command -v npm >/dev/null 2>&1; then
  step "installing nodejs npm"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends nodejs npm
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup" >&2; exit 1; }
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup target list --installed | grep -q '^wasm32-wasip2$' || rustup target add wasm32-wasip2
fi

step "cargo fmt --check"
cargo fmt --all --check
cargo fmt --all --check --manifest-path plugins/Cargo.toml

step "plugins (wasm32-wasip2 components, the Python and the JavaScript one)"
bash plugins/build.sh
cargo clippy --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --locked --target-dir "${CARGO_TARGET_DIR:-plugins/target}/plugins" -- -D warnings

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "discovery environment (static agent, busybox, Debian's kernel)"
agent="$(deploy/build-agent.sh)"
"$agent" agent --root tests/data/machines/a --dry-run >/dev/null
echo "static agent: $agent ($(du -h "$agent" | cut -f1))"
discovery="${CARGO_TARGET_DIR:-target}/discovery"
if ! deploy/build-initramfs.sh --agent "$agent" --out "$discovery"; then
  # The package lists may name a kernel the mirror has replaced: refresh once.
  as_root apt-get update -qq
  deploy/build-initramfs.sh --agent "$agent" --out "$discovery"
fi
export ARGES_DISCOVERY_DIR="$(cd "$discovery" && pwd)"

step "sushy-emulator (Redfish BMC simulator, from PyPI; cached)"
sushy_venv="${ARGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arges}/sushy-venv"
if [ ! -x "$sushy_venv/bin/sushy-emulator" ]; then
  python3 -m venv "$sushy_venv"
  "$sushy_venv/bin/pip" install -q "sushy-tools==2.2.0"
fi
export ARGES_SUSHY_VENV="$sushy_venv"

step "Kubernetes test binaries (control plane, node, Cluster API providers, from Go modules; cached)"
command -v go >/dev/null || { echo "error: go is needed to build the test control plane" >&2; exit 1; }
ARGES_K8S_BIN="$(bash tests/k8s/build-binaries.sh)"
export ARGES_K8S_BIN

step "images (the appliance; Cluster API core, CABPT, cert-manager and pause for the tests' node)"
images="${CARGO_TARGET_DIR:-target}/images"
deploy/build-images.sh --test-images "$ARGES_K8S_BIN" "$images" >/dev/null
ARGES_IMAGES="$(cd "$images" && pwd)"
export ARGES_IMAGES
du -h "$ARGES_IMAGES"/*.tar

# Tests build with the release profile: they then share one build of wasmtime with the
# benches, which saves a full compile in CI. `cargo test` stays the quick inner loop.
step "cargo test --release (unit and integration tests against real peers)"
cargo test --workspace --locked --release
# The plugins' shared host-independent code (IPMI chassis commands) has unit tests too.
cargo test --manifest-path plugins/Cargo.toml --locked -p ipmi-chassis --target-dir "${CARGO_TARGET_DIR:-plugins/target}/plugins-host"

step "benches, quick mode"
cargo bench --workspace --locked --benches -- --quick --noplot

# QEMU machines with real firmware boot from the appliance in network namespaces. They
# need root; ARGES_SKIP_NETBOOT=1 leaves them out, loudly (CI never sets it).
if [ "${ARGES_SKIP_NETBOOT:-}" = 1 ]; then
  step "SKIPPING the network-boot tests: ARGES_SKIP_NETBOOT=1"
else
  step "network boot: QEMU (SeaBIOS+iPXE, OVMF PXE, OVMF HTTP boot) to registered; the guide's deployment on a node"
  cargo test --locked --release --test netboot -- --ignored --test-threads=1 --nocapture
fi

step "Kubernetes mode against a real kube-apiserver"
cargo test --locked --release --test kube -- --ignored --test-threads=2

step "all checks passed"
