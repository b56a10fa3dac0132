#!/usr/bin/env bash
# What provisioning windows cost on the boot path: /boot.ipxe req/s of the appliance
# before machine identity (git revision BEFORE, default the last commit without it) and
# now, side by side in one run, wrk against each in alternation:
#   - unknown machines booting discovery (now: a boot-bound registration secret each),
#   - a registered, unaccepted server booting its disk (a boot record written each time),
#   - an accepted server booting its environment (before: a token every boot; now: the
#     claimant of an armed window asking again, so a secret minted and its hash written).
# Usage: benches/compare/boot-ipxe-windows.sh [RUNS] [SECONDS]   (BEFORE=rev to compare,
# or ARGES_BEFORE_BIN and ARGES_BIN: binaries built already)
source "$(dirname "$0")/lib.sh"
runs="${1:-3}"; secs="${2:-5}"
before_rev="${BEFORE:-ff85a5b}"
need wrk; need python3; need curl; need git

build_before "$before_rev"
build_arges
arges_now="$arges"

config=$'[tokens]\nregistration = "registration-token-for-bench-01"\nadmin = "admin-token-for-bench-000000001"\n\n[environments.talos]\nkernel = "talos/vmlinuz"\ninitrds = ["talos/initramfs.xz"]\ncmdline = "talos.platform=metal talos.config={{ appliance.url }}/configdata?uuid={{ machine.uuid }}&token={{ boot_token }}"'
admin() { curl -sf -o /dev/null -X "$1" -H "Authorization: Bearer admin-token-for-bench-000000001" --data-binary "${3:-}" "http://$http/api/v1/servers/$2"; }
uuid_k=4c4c4544-0042-3510-8051-b4c04f595031; mac_k=b8:ca:3a:00:00:0a
uuid_e=4c4c4544-0042-3510-8051-b4c04f595032; mac_e=b8:ca:3a:00:00:0b
register() {
  curl -sf -o /dev/null -H "Authorization: Bearer registration-token-for-bench-01" \
    --data-binary "{\"uuid\":\"$1\",\"mode\":\"discover\",\"hardware\":{\"vendor\":\"QEMU\",\"nics\":[{\"name\":\"eth0\",\"mac\":\"$2\"}]}}" \
    "http://$http/api/v1/register"
}
for name in before now; do
  mkdir -p "$work/$name/data/assets/talos"
  echo kernel > "$work/$name/data/assets/talos/vmlinuz"; echo initrd > "$work/$name/data/assets/talos/initramfs.xz"
  if [ "$name" = before ]; then arges="$work/arges-before"; else arges="$arges_now"; fi
  # The binary before knows no limits; the one now has them off: windows alone compared.
  if [ "$name" = now ]; then start_arges "$name" "$no_limits$config"; else start_arges "$name" "$config"; fi
  var="http_$name"; http="${!var}"
  register "$uuid_k" "$mac_k"; register "$uuid_e" "$mac_e"
  admin POST "$uuid_e/accept"; admin PUT "$uuid_e/environment" '{"environment":"talos"}'
  admin PUT "$uuid_e/config" 'machine: {}'
  if [ "$name" = now ]; then admin POST "$uuid_e/arm"; fi
done
# The first environment boot of the armed server claims its window (from 127.0.0.1, as
# wrk asks): every later one is the claimant asking again.
curl -s "http://$http_now/boot.ipxe?uuid=$uuid_e&mac=$mac_e&arch=x86_64" | grep -q 'token=[0-9a-f]\{64\}' \
  || { echo "error: the armed server got no token" >&2; exit 1; }

unknown_machines_lua "$work/unknown.lua"

declare -A rps
paths=(unknown "/boot.ipxe?uuid=$uuid_k&mac=$mac_k&arch=x86_64" "/boot.ipxe?uuid=$uuid_e&mac=$mac_e&arch=x86_64")
labels=("unknown machine, discover" "known server, local disk" "accepted server, environment")
for run in $(seq 1 "$runs"); do
  for i in 0 1 2; do
    for name in before now; do
      var="http_$name"
      if [ "$i" = 0 ]; then
        out=$(wrk -t1 -c32 -d"${secs}s" -s "$work/unknown.lua" "http://${!var}")
      else
        out=$(wrk -t1 -c32 -d"${secs}s" "http://${!var}${paths[$i]}")
      fi
      rps[$i$name]+="$(echo "$out" | awk '/Requests\/sec/ {print $2}') "
    done
  done
done
curl -s "http://$http_now/metrics" | grep -q 'arges_secrets_issued_total{kind="config-token"}' \
  || { echo "error: the window's secret was not handed out" >&2; exit 1; }
curl -s "http://$http_now/metrics" | grep -q 'arges_identity_alarms_total' \
  && { echo "error: an alarm was raised by the bench's own requests" >&2; exit 1; }
echo "/boot.ipxe before ($before_rev) and with provisioning windows, $runs alternating runs of ${secs}s, wrk -t1 -c32, medians ($(nproc) cores):"
for i in 0 1 2; do
  b=$(median ${rps[${i}before]}); n=$(median ${rps[${i}now]})
  printf '  %-30s before %10s req/s   now %10s req/s   now/before %s\n' "${labels[$i]}" "$b" "$n" "$(ratio "$n" "$b")"
done
