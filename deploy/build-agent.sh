#!/usr/bin/env bash
# Builds `arges` as a static binary for the discovery initramfs (the agent runs from it)
# and checks that it really is static. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --no-default-features --target "$triple" --bin arges >&2
bin="$target_dir/$triple/release/arges"
out="$target_dir/arges-agent-static"
strip -o "$out" "$bin" 2>/dev/null || cp "$bin" "$out"
if ldd "$out" 2>&1 | grep -qE "not a dynamic executable|statically linked"; then
  echo "$out"
else
  echo "error: $out is not static:" >&2
  ldd "$out" >&2
  exit 1
fi
