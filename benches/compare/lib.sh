# Helpers for the side-by-side comparison scripts (sourced, not run).
# Everything runs on loopback; every load is bounded by count and time.

set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
work="$(mktemp -d /tmp/arges-compare.XXXXXX)"
chmod 755 "$work"  # peers such as nginx read it as another user
pids=()
cgroups=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.2
  for g in "${cgroups[@]}"; do rmdir "$g" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "error: $1 is needed (apt-get install ${2:-$1})" >&2; exit 1; }; }

# Builds the release binary; ARGES_BIN=path uses that binary instead.
build_arges() {
  if [ -n "${ARGES_BIN:-}" ]; then arges="$ARGES_BIN"; return; fi
  (cd "$repo" && cargo build --release --locked --bin arges >&2)
  arges="$target_dir/release/arges"
}

# build_before REV: the binary of git revision REV as $work/arges-before, built in a
# worktree that shares the cargo target (only the arges crate is rebuilt), copied aside
# before the current one is built; ARGES_BEFORE_BIN=path uses a binary built already.
build_before() {
  if [ -n "${ARGES_BEFORE_BIN:-}" ]; then
    cp "$ARGES_BEFORE_BIN" "$work/arges-before"
    return
  fi
  git -C "$repo" worktree add --detach "$work/before-src" "$1" >/dev/null 2>&1
  (cd "$work/before-src" && cargo build --release --locked --bin arges >&2)
  cp "$target_dir/release/arges" "$work/arges-before"
  git -C "$repo" worktree remove --force "$work/before-src"
}

# unknown_machines_lua FILE: a wrk script asking /boot.ipxe as a new machine (UUID and
# MAC) every request.
unknown_machines_lua() {
  cat > "$1" <<'LUA'
counter = 0
request = function()
  counter = counter + 1
  local uuid = string.format("00000000-0000-4000-8000-%012d", counter)
  local mac = string.format("52:54:00:%02x:%02x:%02x", math.floor(counter / 65536) % 256, math.floor(counter / 256) % 256, counter % 256)
  return wrk.format("GET", "/boot.ipxe?uuid=" .. uuid .. "&mac=" .. mac .. "&arch=x86_64")
end
LUA
}

# Top-level config keys that turn the per-source limits off (a load from one address is
# not an abuse here); prepend to a config for an appliance that knows them.
no_limits=$'http.boot_per_source_per_sec = 0\nhttp.registrations_per_source_per_sec = 0\nhttp.max_connections_per_source = 100000\nhttp.max_connections = 100000\n'

# start_arges NAME CONFIG_TOML: starts an appliance in $work/NAME on loopback port 0 and
# sets $http_<NAME> and $tftp_<NAME> to the bound addresses.
start_arges() {
  local name="$1" config="$2" dir="$work/$1"
  mkdir -p "$dir"
  printf '%s\n' "$config" > "$dir/appliance.toml"
  ARGES_LOG=warn "$arges" run --config "$dir/appliance.toml" --data-dir "$dir/data" \
    --http 127.0.0.1:0 --tftp 127.0.0.1:0 --ready-file "$dir/ready.json" 2>"$dir/log" &
  pids+=($!)
  for _ in $(seq 1 300); do [ -f "$dir/ready.json" ] && break; sleep 0.1; done
  [ -f "$dir/ready.json" ] || { echo "error: $name did not start:" >&2; cat "$dir/log" >&2; exit 1; }
  local http tftp
  http=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"][0])' "$dir/ready.json")
  tftp=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tftp"][0])' "$dir/ready.json")
  printf -v "http_$name" '%s' "$http"
  printf -v "tftp_$name" '%s' "$tftp"
}

# median N1 N2 ...
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }

# CPU accounting of a server and everything it forks (tftpd-hpa forks per transfer, and
# /proc/PID/stat never sees those children): a cgroup per server, v1 cpuacct or v2 cpu.stat.
# Falls back to the process's own CPU time when cgroups are not writable.
if [ -w /sys/fs/cgroup/cpuacct ]; then cg_root=/sys/fs/cgroup/cpuacct; cg_kind=v1
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -w /sys/fs/cgroup ]; then cg_root=/sys/fs/cgroup; cg_kind=v2
else cg_root=""; cg_kind=none; fi
declare -A cg_of

# track_cpu NAME PID: start accounting PID (and its future children) under NAME.
track_cpu() {
  if [ -n "$cg_root" ] && mkdir "$cg_root/arges-compare-$$-$1" 2>/dev/null; then
    cg_of[$1]="$cg_root/arges-compare-$$-$1"; cgroups+=("${cg_of[$1]}")
    echo "$2" > "${cg_of[$1]}/cgroup.procs"
  else
    cg_of[$1]="pid:$2"
  fi
}

# cpu_ns NAME: CPU nanoseconds used so far by what track_cpu put under NAME.
cpu_ns() {
  local g="${cg_of[$1]}"
  case "$g" in
    pid:*) awk -v hz="$(getconf CLK_TCK)" '{printf "%.0f", ($14 + $15 + $16 + $17) / hz * 1e9}' "/proc/${g#pid:}/stat" ;;
    *) if [ "$cg_kind" = v1 ]; then cat "$g/cpuacct.usage"; else awk '/^usage_usec/ {printf "%.0f", $2 * 1000}' "$g/cpu.stat"; fi ;;
  esac
}
