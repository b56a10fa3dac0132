#!/usr/bin/env bash
# Builds every shipped plugin into plugins/out/: the Rust ones for wasm32-wasip2, the
# Python one with componentize-py and the JavaScript one with componentize-js (installed
# under $ARGES_TOOLS, default ~/.cache/arges-tools, if missing: a venv and an npm
# prefix). Prints the output folder.
set -euo pipefail
cd "$(dirname "$0")"
out="$PWD/out"
mkdir -p "$out"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -q '^wasm32-wasip2$'; then
  rustup target add wasm32-wasip2 >&2
fi
cargo build --release --locked --target wasm32-wasip2 --target-dir "$target_dir/plugins" >&2
for crate in default_policy hardware_policy faults ipmi supermicro redfish driver_faults; do
  cp "$target_dir/plugins/wasm32-wasip2/release/$crate.wasm" "$out/${crate//_/-}.wasm"
done

tools="${ARGES_TOOLS:-$HOME/.cache/arges-tools}"
cpy="$tools/venv/bin/componentize-py"
if [ ! -x "$cpy" ]; then
  python3 -m venv "$tools/venv" >&2
  "$tools/venv/bin/pip" install -q "componentize-py==0.25.1" >&2
fi
if [ ! -f "$out/deny-list-py.wasm" ] || [ deny-list-py/app.py -nt "$out/deny-list-py.wasm" ] || [ ../wit/plugin.wit -nt "$out/deny-list-py.wasm" ]; then
  (cd deny-list-py && "$cpy" -d ../../wit -w boot-policy componentize app -o "$out/deny-list-py.wasm" >&2)
fi

# componentize-js, the version the JavaScript starter pins (plugins/starters/js).
cjs_version=$(sed -n 's/.*"@bytecodealliance\/componentize-js": "\(.*\)".*/\1/p' starters/js/package.json)
cjs="$tools/js/node_modules/.bin/componentize-js"
if [ ! -x "$cjs" ] || ! grep -q "\"version\": \"$cjs_version\"" "$tools/js/node_modules/@bytecodealliance/componentize-js/package.json"; then
  mkdir -p "$tools/js"
  npm install --silent --no-audit --no-fund --prefix "$tools/js" "@bytecodealliance/componentize-js@$cjs_version" >&2
fi
if [ ! -f "$out/rack-gate-js.wasm" ] || [ rack-gate-js/policy.js -nt "$out/rack-gate-js.wasm" ] || [ ../wit/plugin.wit -nt "$out/rack-gate-js.wasm" ]; then
  (cd rack-gate-js && "$cjs" policy.js --wit ../../wit --world-name boot-policy --disable http fetch-event --out "$out/rack-gate-js.wasm" >&2)
fi
echo "$out"
