#!/usr/bin/env bash
# /boot.ipxe served with the built-in policy vs with the default-policy plugin, side by
# side in one run: wrk against each in alternation, a different machine per request.
# Usage: benches/compare/boot-ipxe-plugin.sh [RUNS] [SECONDS]
source "$(dirname "$0")/lib.sh"
runs="${1:-3}"; secs="${2:-5}"
need wrk; need python3
build_arges
plugins_out="$(bash "$repo/plugins/build.sh")"

start_arges builtin "$no_limits"
start_arges plugin "$no_limits"$'[plugins]\nreuse_instances = true'
cp "$plugins_out/default-policy.wasm" "$work/plugin/data/plugins/"
for _ in $(seq 1 100); do curl -s "http://$http_plugin/metrics" | grep -q '^arges_plugins_active 1' && break; sleep 0.1; done

unknown_machines_lua "$work/machines.lua"

declare -A rps p99
for run in $(seq 1 "$runs"); do
  for name in builtin plugin; do
    var="http_$name"
    out=$(wrk -t1 -c32 -d"${secs}s" --latency -s "$work/machines.lua" "http://${!var}")
    rps[$name]+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "
    p99[$name]+="$(echo "$out" | awk '$1 == "99%" {v=$2; if (v ~ /ms$/) {sub(/ms/,"",v); v*=1000} else if (v ~ /us$/) {sub(/us/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000000}; print v}') "
  done
done
curl -s "http://$http_plugin/metrics" | grep -q 'arges_plugin_calls_total{plugin="default-policy",result="decided"}' \
  || { echo "error: the plugin was not called" >&2; exit 1; }
b=$(median ${rps[builtin]}); p=$(median ${rps[plugin]})
echo "/boot.ipxe, $runs alternating runs of ${secs}s each, wrk -t1 -c32, medians ($(nproc) cores):"
printf '  %-28s %10s req/s  p99 %8s us\n' "built-in policy" "$b" "$(median ${p99[builtin]})"
printf '  %-28s %10s req/s  p99 %8s us\n' "default-policy plugin" "$p" "$(median ${p99[plugin]})"
echo "  plugin/built-in throughput: $(ratio "$p" "$b")"
