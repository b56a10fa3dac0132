#!/bin/sh
# Builds {{name}}.wasm with componentize-js (Node.js 20 or later).
set -eu
cd "$(dirname "$0")"
[ -d node_modules ] || npm install --no-audit --no-fund
npm run --silent build
echo "$PWD/{{name}}.wasm"
