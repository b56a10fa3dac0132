#!/usr/bin/env bash
# Builds the discovery environment: a kernel and a small initramfs (busybox-static, the
# static `arges agent`, the kernel's NIC and disk drivers, and an init that brings up the
# network, registers, and powers off or reboots as the appliance says).
#
#   deploy/build-initramfs.sh [--out DIR] [--kernel-package PKG | --kernel-root DIR]
#                             [--agent BIN] [--modules "m1 m2 ..."]
#
# DIR defaults to arges-data/assets/discovery, where the default config looks for
# vmlinuz and initramfs.img. The kernel is any Linux kernel: by default Debian's
# linux-image package (fetched with `apt-get download` into the cache, never installed),
# or an unpacked tree with boot/vmlinuz-* and lib/modules/* (--kernel-root /, say).
# Needs: busybox-static, cpio, gzip, binutils (objcopy reads module dependencies).
# Prints the output folder.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

out="arges-data/assets/discovery"
kernel_pkg=""
kernel_root=""
agent=""
# The virtio PCI transport with virtual NICs and disks (what the tests boot), then the NICs and storage controllers
# common in servers. Drivers for absent hardware load and sit idle.
modules="${ARGES_INITRAMFS_MODULES:-virtio_pci virtio_net virtio_blk virtio_scsi e1000 e1000e igb ixgbe i40e ice bnxt_en tg3 bnx2 nvme ahci sd_mod megaraid_sas mpt3sas}"
cache="${ARGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/arges}"

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --kernel-package) kernel_pkg="$2"; shift 2 ;;
    --kernel-root) kernel_root="$2"; shift 2 ;;
    --agent) agent="$2"; shift 2 ;;
    --modules) modules="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "error: $*" >&2; exit 1; }
for tool in cpio gzip objcopy; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install cpio gzip binutils)"
done
busybox=/bin/busybox
[ -x "$busybox" ] || die "no $busybox: apt-get install busybox-static"
{ ldd "$busybox" 2>&1 || true; } | grep -qE "not a dynamic executable|statically linked" \
  || die "$busybox is not static (install busybox-static, not busybox)"

# The kernel: an unpacked Debian package, cached by package name and version.
if [ -z "$kernel_root" ]; then
  if [ -z "$kernel_pkg" ]; then
    kernel_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)"
    [ -n "$kernel_pkg" ] || die "cannot resolve linux-image-amd64 (run apt-get update, or pass --kernel-package / --kernel-root)"
  fi
  version="$(apt-cache show "$kernel_pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
  kernel_root="$cache/kernel/$kernel_pkg-$version"
  if [ ! -d "$kernel_root/boot" ]; then
    echo "fetching $kernel_pkg $version" >&2
    tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download "$kernel_pkg=$version" >&2) || die "cannot download $kernel_pkg"
    mkdir -p "$kernel_root.partial"
    dpkg-deb -x "$tmp"/*.deb "$kernel_root.partial"
    rm -rf "$tmp"
    mv "$kernel_root.partial" "$kernel_root"
  fi
fi
vmlinuz="$(ls "$kernel_root"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1)"
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* under $kernel_root"
kver="${vmlinuz##*/vmlinuz-}"
moddir="$kernel_root/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules for $kver under $kernel_root/lib/modules"

if [ -z "$agent" ]; then
  agent="$("$repo/deploy/build-agent.sh")"
fi
[ -x "$agent" ] || die "agent $agent is not an executable"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,run,lib/modules}
cp "$busybox" "$root/bin/busybox"
cp "$agent" "$root/bin/arges"

# Modules with their dependencies, dependencies first. A module's `depends=` lives in
# its .modinfo section; objcopy reads it without kmod. Each is stored uncompressed,
# because busybox's insmod takes plain .ko files.
declare -A path_of=() done_mod=()
while IFS= read -r ko; do
  name="${ko##*/}"; name="${name%%.ko*}"; path_of["${name//-/_}"]="$ko"
done < <(find "$moddir/kernel" -name '*.ko*')
order=()
deps_of() {
  local ko="$1" tmpf="$work/modinfo"
  case "$ko" in
    *.ko.xz) xz -dc "$ko" > "$work/m.ko"; ko="$work/m.ko" ;;
    *.ko.zst) zstd -qdc "$ko" > "$work/m.ko"; ko="$work/m.ko" ;;
    *.ko.gz) gzip -dc "$ko" > "$work/m.ko"; ko="$work/m.ko" ;;
  esac
  objcopy -O binary --only-section=.modinfo "$ko" "$tmpf" 2>/dev/null || { : > "$tmpf"; }
  tr '\0' '\n' < "$tmpf" | sed -n 's/^depends=//p' | tr ',' ' '
}
add_module() {
  local name="${1//-/_}"
  [ -n "${done_mod[$name]:-}" ] && return 0
  done_mod["$name"]=1
  local ko="${path_of[$name]:-}"
  if [ -z "$ko" ]; then
    # Built into this kernel, or absent from it: nothing to load either way.
    return 0
  fi
  local dep
  for dep in $(deps_of "$ko"); do add_module "$dep"; done
  order+=("$name")
}
for m in $modules; do add_module "$m"; done
for name in "${order[@]}"; do
  ko="${path_of[$name]}"
  case "$ko" in
    *.ko.xz) xz -dc "$ko" ;;
    *.ko.zst) zstd -qdc "$ko" ;;
    *.ko.gz) gzip -dc "$ko" ;;
    *) cat "$ko" ;;
  esac > "$root/lib/modules/$name.ko"
  echo "$name" >> "$root/etc/modules"
done
touch "$root/etc/modules"

install -m 0755 "$repo/deploy/initramfs/init" "$root/init"
install -m 0755 "$repo/deploy/initramfs/udhcpc.script" "$root/etc/udhcpc.script"

mkdir -p "$out"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner 0:0) \
  | gzip -9n > "$out/initramfs.img.tmp"
mv "$out/initramfs.img.tmp" "$out/initramfs.img"
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "initramfs: ${#order[@]} modules, kernel $kver, $(du -h "$out/initramfs.img" | cut -f1)" >&2
echo "$out"
