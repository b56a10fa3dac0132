#!/usr/bin/env bash
# Boot storm: N simulated machines against one appliance on loopback, each fetching a
# 1 MiB iPXE binary over TFTP, /boot.ipxe, a 10 MiB kernel and a 60 MiB initrd over HTTP,
# then registering. Usage: benches/compare/bootstorm.sh [N...] (default: 100 1000)
source "$(dirname "$0")/lib.sh"
sizes=("${@:-100 1000}"); [ $# -gt 0 ] && sizes=("$@") || sizes=(100 1000)
build_arges
assets="$work/assets"; mkdir -p "$assets/discovery" "$work/tftp"
head -c $((1 << 20)) /dev/urandom > "$work/tftp/ipxe.efi"
head -c $((10 << 20)) /dev/urandom > "$assets/discovery/vmlinuz"
head -c $((60 << 20)) /dev/urandom > "$assets/discovery/initramfs.img"
token="bootstorm-registration-token-000001"
start_arges storm "$no_limits$(printf 'assets_dir = "%s"\n[tftp]\nroot = "%s"\n[tokens]\nregistration = "%s"\n' "$assets" "$work/tftp" "$token")"
echo "Boot storm on loopback ($(nproc) cores, $(date -u +%F)): 1 MiB TFTP + 10 MiB kernel + 60 MiB initrd + registration per machine"
for n in "${sizes[@]}"; do
  ARGES_LOG=warn "$arges" loadtest --http "$http_storm" --tftp "$tftp_storm" --token "$token" \
    --file ipxe.efi --machines "$n" --concurrency 100 --max-seconds 900
done
