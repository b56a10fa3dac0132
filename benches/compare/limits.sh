#!/usr/bin/env bash
# What the abuse limits cost on the boot path: the appliance before them (git revision
# BEFORE, default the last commit without them) and now with every limit on but set so
# wide nothing is refused (each check still runs), side by side in one run, alternating:
#   - /boot.ipxe of unknown machines, a new one each request (the per-source token
#     bucket, the connection admission, the idle watch on every byte; no fsync),
#   - /boot.ipxe of a registered server (the same, behind a boot record's fsync),
#   - a 512-byte asset (connection admission and idle watch alone),
#   - TFTP: 300 fetches of a 4 KiB file one after another (the handshake, then the slot).
# Usage: benches/compare/limits.sh [RUNS] [SECONDS]   (BEFORE=rev, or ARGES_BEFORE_BIN and
# ARGES_BIN: binaries built already)
source "$(dirname "$0")/lib.sh"
runs="${1:-3}"; secs="${2:-5}"
before_rev="${BEFORE:-369b2d9}"
need wrk; need python3; need curl; need git

build_before "$before_rev"
build_arges
arges_now="$arges"

uuid=4c4c4544-0042-3510-8051-b4c04f595031; mac=b8:ca:3a:00:00:0a
wide=$'http.boot_per_source_per_sec = 1000000000\nhttp.boot_per_source_burst = 1000000000\nhttp.registrations_per_source_per_sec = 1000000000\nhttp.registrations_per_source_burst = 1000000000\nhttp.max_connections_per_source = 100000\nhttp.max_connections = 100000\n'
for name in before now; do
  mkdir -p "$work/$name/data/assets" "$work/$name/data/tftp"
  head -c 512 /dev/urandom > "$work/$name/data/assets/small.bin"
  head -c 4096 /dev/urandom > "$work/$name/data/tftp/small.bin"
  config=$'[tokens]\nregistration = "registration-token-for-bench-01"\nadmin = "admin-token-for-bench-000000001"\n'
  if [ "$name" = before ]; then arges="$work/arges-before"; else arges="$arges_now"; config="$wide$config"; fi
  start_arges "$name" "$config"
  var="http_$name"; http="${!var}"
  curl -sf -o /dev/null -H "Authorization: Bearer registration-token-for-bench-01" \
    --data-binary "{\"uuid\":\"$uuid\",\"mode\":\"discover\",\"hardware\":{\"vendor\":\"QEMU\",\"nics\":[{\"name\":\"eth0\",\"mac\":\"$mac\"}]}}" \
    "http://$http/api/v1/register"
done

tftp_rate() { # fetches per second of 300 sequential small TFTP transfers
  local addr="$1" start end
  start=$(date +%s.%N)
  for _ in $(seq 1 300); do curl -s -o /dev/null "tftp://$addr/small.bin"; done
  end=$(date +%s.%N)
  awk -v s="$start" -v e="$end" 'BEGIN {printf "%.1f", 300 / (e - s)}'
}

unknown_machines_lua "$work/unknown.lua"

declare -A r
for run in $(seq 1 "$runs"); do
  for name in before now; do
    var="http_$name"; tvar="tftp_$name"
    r[unknown$name]+="$(wrk -t1 -c32 -d"${secs}s" -s "$work/unknown.lua" "http://${!var}" | awk '/Requests\/sec/ {print $2}') "
    r[boot$name]+="$(wrk -t1 -c32 -d"${secs}s" "http://${!var}/boot.ipxe?uuid=$uuid&mac=$mac&arch=x86_64" | awk '/Requests\/sec/ {print $2}') "
    r[small$name]+="$(wrk -t1 -c32 -d"${secs}s" "http://${!var}/assets/small.bin" | awk '/Requests\/sec/ {print $2}') "
    r[tftp$name]+="$(tftp_rate "${!tvar}") "
  done
done
curl -s "http://$http_now/metrics" | grep -q 'arges_limited_total' \
  && { echo "error: a limit refused the bench's own requests" >&2; exit 1; }
echo "Before the abuse limits ($before_rev) and with them (on, nothing refused), $runs alternating runs, medians ($(nproc) cores):"
for k in unknown boot small tftp; do
  case $k in unknown) label="/boot.ipxe unknown, wrk -c32, req/s";; boot) label="/boot.ipxe known, wrk -c32, req/s";; small) label="512 B asset, wrk -c32, req/s";; tftp) label="TFTP 4 KiB fetches/s, sequential";; esac
  b=$(median ${r[${k}before]}); n=$(median ${r[${k}now]})
  printf '  %-34s before %10s   now %10s   now/before %s\n' "$label" "$b" "$n" "$(ratio "$n" "$b")"
done
