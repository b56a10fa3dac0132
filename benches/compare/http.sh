#!/usr/bin/env bash
# HTTP, side by side: Arges assets vs nginx (sendfile on), in alternation, medians and the
# ratio Arges/nginx. A 256 MiB file with curl; a small response with wrk (requests/s and
# p99); and /boot.ipxe rendered per machine (wrk, a different machine per request).
# Usage: benches/compare/http.sh [RUNS] [SECONDS]
source "$(dirname "$0")/lib.sh"
runs="${1:-3}"; secs="${2:-5}"
need curl; need wrk; need nginx nginx-light; need python3
build_arges

assets="$work/assets"; mkdir -p "$assets"
head -c $((256 << 20)) /dev/urandom > "$assets/rootfs.img"
head -c 512 /dev/urandom > "$assets/small.bin"
chmod -R a+rX "$assets"

start_arges arges "$no_limits$(printf 'assets_dir = "%s"\n' "$assets")"
nport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes auto;
daemon off;
error_log stderr warn;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path $work/nginx/tmp; proxy_temp_path $work/nginx/tmp; fastcgi_temp_path $work/nginx/tmp;
  uwsgi_temp_path $work/nginx/tmp; scgi_temp_path $work/nginx/tmp;
  server { listen 127.0.0.1:$nport; location /assets/ { alias $assets/; } }
}
CONF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
sleep 0.5
declare -A base=([arges]="http://$http_arges" [nginx]="http://127.0.0.1:$nport")

p99_us() { awk '$1 == "99%" {v=$2; if (v ~ /ms$/) {sub(/ms/,"",v); v*=1000} else if (v ~ /us$/) {sub(/us/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000000}; print v}'; }
declare -A big small smallp99
for run in $(seq 1 "$runs"); do
  for s in arges nginx; do
    mbs=$(curl -s -o "$work/out" -w '%{speed_download}' "${base[$s]}/assets/rootfs.img")
    cmp -s "$work/out" "$assets/rootfs.img" || mbs=0
    big[$s]+="$(awk -v b="$mbs" 'BEGIN {printf "%.0f", b / 1e6}') "
    out=$(wrk -t1 -c32 -d"${secs}s" --latency "${base[$s]}/assets/small.bin")
    if echo "$out" | grep -q "Non-2xx"; then echo "error: $s answered errors:" >&2; echo "$out" >&2; exit 1; fi
    small[$s]+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "
    smallp99[$s]+="$(echo "$out" | p99_us) "
  done
done
rm -f "$work/out"
unknown_machines_lua "$work/machines.lua"
boot=""; bootp99=""
for run in $(seq 1 "$runs"); do
  out=$(wrk -t1 -c32 -d"${secs}s" --latency -s "$work/machines.lua" "${base[arges]}")
  boot+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "; bootp99+="$(echo "$out" | p99_us) "
done

echo "HTTP on loopback, median of $runs alternating runs ($(nproc) cores, $(date -u +%F)):"
printf '  %-34s %12s %12s %10s\n' "" arges nginx arges/nginx
printf '  %-34s %12s %12s %10s\n' "256 MiB file, curl, MB/s" "$(median ${big[arges]})" "$(median ${big[nginx]})" "$(ratio "$(median ${big[arges]})" "$(median ${big[nginx]})")"
printf '  %-34s %12s %12s %10s\n' "512 B file, wrk -c32, req/s" "$(median ${small[arges]})" "$(median ${small[nginx]})" "$(ratio "$(median ${small[arges]})" "$(median ${small[nginx]})")"
printf '  %-34s %12s %12s\n' "512 B file, p99 (us)" "$(median ${smallp99[arges]})" "$(median ${smallp99[nginx]})"
printf '  %-34s %12s %12s\n' "/boot.ipxe per machine, req/s" "$(median $boot)" "-"
printf '  %-34s %12s %12s\n' "/boot.ipxe per machine, p99 (us)" "$(median $bootp99)" "-"
