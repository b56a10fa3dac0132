#!/usr/bin/env bash
# TFTP, side by side: Arges vs tftpd-hpa vs dnsmasq, the same files and real clients,
# servers taken in alternation, medians and the ratio Arges/peer.
#   single transfers of a 64 MiB file: curl at blksize 512, 1468, 65464; atftp at blksize
#   1468 with windowsize 1, 8, 16, 64 (the peers do not do windowsize: they answer in
#   lockstep, which is their best);
#   concurrent: 20 and 200 curl clients fetching a 16 MiB file at blksize 1468: aggregate
#   MB/s, slowest client, server CPU seconds per GB served.
# dnsmasq can only listen on port 69: it is skipped when that is not possible (not root).
# Usage: benches/compare/tftp.sh [RUNS]
source "$(dirname "$0")/lib.sh"
runs="${1:-3}"
need curl; need atftp; need in.tftpd tftpd-hpa; need python3
build_arges

root="$work/root"; mkdir -p "$root"
head -c $((64 << 20)) /dev/urandom > "$root/big.bin"
head -c $((16 << 20)) /dev/urandom > "$root/mid.bin"

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_arges arges "$no_limits$(printf '[tftp]\nroot = "%s"\nmax_transfers_per_client = 1000\nmax_windowsize = 64\n' "$root")"
servers=(arges); declare -A port pid
port[arges]="${tftp_arges##*:}"; pid[arges]="${pids[-1]}"

port[tftpd]="$(free_port)"
in.tftpd -L -a "127.0.0.1:${port[tftpd]}" -s "$root" -u root &
pid[tftpd]=$!; pids+=($!); servers+=(tftpd)

if [ "$(id -u)" = 0 ] && command -v dnsmasq >/dev/null && ! ss -lun 2>/dev/null | grep -q '127.0.0.1:69 '; then
  dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0 --enable-tftp --tftp-root="$root" \
    --listen-address=127.0.0.1 --bind-interfaces --edns-packet-max=65535 --tftp-max=1000 --user=root \
    --pid-file="$work/dnsmasq.pid" 2>"$work/dnsmasq.log" &
  pid[dnsmasq]=$!; pids+=($!); port[dnsmasq]=69; servers+=(dnsmasq)
else
  echo "note: dnsmasq skipped (needs root and a free 127.0.0.1:69)" >&2
fi
for s in "${servers[@]}"; do track_cpu "$s" "${pid[$s]}"; done
sleep 0.5

now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" -v e="$3" 'BEGIN {printf "%.1f", b / (e - s) / 1e6}'; }

fetch() { # fetch SERVER CLIENT ARG OUT
  local p="${port[$1]}"
  case "$2" in
    curl) curl -s --max-time 300 -o "$4" --tftp-blksize "$3" "tftp://127.0.0.1:$p/big.bin" ;;
    atftp) atftp -g -r big.bin -l "$4" --option "blksize 1468" --option "windowsize $3" 127.0.0.1 "$p" >/dev/null 2>&1 ;;
  esac
}

declare -A results
cases=("curl 512" "curl 1468" "curl 65464" "atftp 1" "atftp 8" "atftp 16" "atftp 64")
for run in $(seq 1 "$runs"); do
  for c in "${cases[@]}"; do
    set -- $c
    for s in "${servers[@]}"; do
      out="$work/out.$s"; rm -f "$out"
      t0=$(now); fetch "$s" "$1" "$2" "$out" || true; t1=$(now)
      if cmp -s "$out" "$root/big.bin"; then v=$(mbps $((64 << 20)) "$t0" "$t1"); else v=0; fi
      results["$c|$s"]+="$v "
    done
  done
done

hdr() { printf '  %-22s' "$1"; for s in "${servers[@]}"; do printf '%10s' "$s"; done; for s in "${servers[@]:1}"; do printf '%12s' "arges/$s"; done; echo; }
echo "TFTP, 64 MiB file, MB/s, median of $runs alternating runs ($(nproc) cores, $(date -u +%F)):"
hdr "client"
for c in "${cases[@]}"; do
  set -- $c; label="$1 $( [ "$1" = curl ] && echo "blksize $2" || echo "1468 window $2")"
  printf '  %-22s' "$label"
  declare -A med
  for s in "${servers[@]}"; do med[$s]=$(median ${results["$c|$s"]}); printf '%10s' "${med[$s]}"; done
  for s in "${servers[@]:1}"; do printf '%12s' "$(ratio "${med[arges]}" "${med[$s]}")"; done
  echo
done

echo
echo "TFTP, concurrent curl clients, 16 MiB file, blksize 1468 (one run each):"
printf '  %-10s %-8s %12s %14s %14s\n' clients server "MB/s total" "slowest (s)" "CPU s per GB"
for n in 20 200; do
  for s in "${servers[@]}"; do
    c0=$(cpu_ns "$s"); t0=$(now); cpids=()
    for i in $(seq 1 "$n"); do
      curl -s --max-time 300 -o "$work/c.$i" --tftp-blksize 1468 "tftp://127.0.0.1:${port[$s]}/mid.bin" -w '%{time_total}\n' > "$work/t.$i" &
      cpids+=($!)
    done
    for p in "${cpids[@]}"; do wait "$p" || true; done
    t1=$(now); c1=$(cpu_ns "$s")
    ok=0; for i in $(seq 1 "$n"); do cmp -s "$work/c.$i" "$root/mid.bin" && ok=$((ok + 1)); done
    slowest=$(cat "$work"/t.* | sort -g | tail -1)
    cpu_gb=$(awk -v c=$((c1 - c0)) -v b=$((ok * (16 << 20))) 'BEGIN {printf "%.2f", (b > 0 ? c / 1e9 / (b / 1e9) : 0)}')
    printf '  %-10s %-8s %12s %14s %14s%s\n' "$n" "$s" "$(mbps $((ok * (16 << 20))) "$t0" "$t1")" "$slowest" "$cpu_gb" "$( [ "$ok" = "$n" ] || echo "  ($((n - ok)) failed)")"
    rm -f "$work"/c.* "$work"/t.*
  done
done
