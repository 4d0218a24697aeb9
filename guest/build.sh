#!/usr/bin/env bash
# Builds the vmsnap test guest into guest/out: vmlinuz (Debian's cloud kernel)
# and initrd.img (busybox, guest/init and the few kernel modules it needs).
#
# Everything comes from Debian's archive through `apt-get download` (nothing is
# installed on the host except missing build tools), so the guest is the same on
# every Debian 12 machine. Runs as root from scripts/setup.sh; re-running it
# when guest/out is up to date only checks a stamp and exits.
set -euo pipefail
cd "$(dirname "$0")"
guest_dir=$PWD
script=$guest_dir/$(basename "$0")
out_dir=$guest_dir/out

# Modules the guest loads, in no particular order: their dependencies are
# resolved from each module's own `depends=` field below.
wanted_modules=(virtio_pci virtio_blk button evdev)

log() { echo "guest/build.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# The installed kernel meta package names the versioned image package that
# really holds the kernel; resolving it here keeps the script working when
# Debian moves to a new ABI.
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

package_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}

ensure_tools() {
    local missing=()
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    command -v gzip >/dev/null 2>&1 || missing+=(gzip)
    command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
    command -v zstd >/dev/null 2>&1 || missing+=(zstd)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing tools (${missing[*]}): run as root or install them"
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

kpkg=$(kernel_package)
if [ -z "$kpkg" ]; then
    [ "$(id -u)" = 0 ] || die "apt does not know linux-image-cloud-amd64: run 'apt-get update' as root"
    apt-get update -qq
    kpkg=$(kernel_package)
    [ -n "$kpkg" ] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
fi
kver=$(package_version "$kpkg")
bver=$(package_version busybox-static)
inputs_hash=$(cat "$script" "$guest_dir/init" | sha256sum | cut -c1-16)
stamp="$kpkg $kver busybox-static $bver inputs $inputs_hash"

if [ -f "$out_dir/stamp" ] && [ -f "$out_dir/vmlinuz" ] && [ -f "$out_dir/initrd.img" ] \
    && [ "$(cat "$out_dir/stamp")" = "$stamp" ]; then
    log "up to date ($stamp)"
    exit 0
fi

ensure_tools
work=$(mktemp -d /tmp/vmsnap-guest-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/pkg" "$work/root"

log "downloading $kpkg $kver and busybox-static $bver"
# apt's sandbox user cannot write into a root-owned mktemp dir.
chmod 0755 "$work"; chmod 0777 "$work/debs"
(cd "$work/debs" && apt-get download -qq "$kpkg" busybox-static) \
    || die "apt-get download failed (run 'apt-get update' as root?)"
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/pkg"
done

kernel_release=${kpkg#linux-image-}
vmlinuz="$work/pkg/boot/vmlinuz-$kernel_release"
moddir="$work/pkg/lib/modules/$kernel_release"
[ -f "$vmlinuz" ] || die "$kpkg has no /boot/vmlinuz-$kernel_release"
[ -d "$moddir" ] || die "$kpkg has no /lib/modules/$kernel_release"
[ -x "$work/pkg/bin/busybox" ] || die "busybox-static has no /bin/busybox"

# Find a module file by name (Debian may ship .ko, .ko.xz or .ko.zst; kernel
# module names treat - and _ alike).
module_file() {
    local name=$1 alt=${1//_/-}
    find "$moddir/kernel" \( -name "$name.ko*" -o -name "$alt.ko*" \) -print -quit
}

# Uncompressed copy of a module, so busybox insmod can load it.
plain_module() {
    local src=$1 dst=$2
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module compression: $src" ;;
    esac
}

# Depth-first walk of the dependency graph; appends each module after its
# dependencies so the init can insmod the list in order.
declare -A visited=()
load_order=()
visit() {
    local name=${1//-/_} file deps dep plain
    [ -n "${visited[$name]:-}" ] && return 0
    visited[$name]=1
    if grep -qE "/${name//_/[_-]}\.ko$" "$moddir/modules.builtin"; then
        return 0
    fi
    file=$(module_file "$name")
    [ -n "$file" ] || die "module $name is neither built in nor shipped in $kpkg"
    plain="$work/root/lib/modules/$name.ko"
    mkdir -p "$work/root/lib/modules"
    plain_module "$file" "$plain"
    deps=$(tr '\0' '\n' <"$plain" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    load_order+=("$name")
}
for m in "${wanted_modules[@]}"; do
    visit "$m"
done

root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,etc/acpi/PWRF}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$guest_dir/init" "$root/init"
printf '%s\n' "${load_order[@]}" >"$root/etc/modules"
# busybox acpid runs /etc/acpi/PWRF/00000080 when the ACPI power button is
# pressed (QMP system_powerdown), so `shutdown` of a domain powers it off.
printf '#!/bin/sh\npoweroff -f\n' >"$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"
echo "$stamp" >"$root/etc/vmsnap-guest-version"

mkdir -p "$out_dir"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    | gzip -9n >"$work/initrd.img"
cp "$vmlinuz" "$work/vmlinuz"
mv "$work/initrd.img" "$out_dir/initrd.img"
mv "$work/vmlinuz" "$out_dir/vmlinuz"
echo "$stamp" >"$out_dir/stamp"
log "built $out_dir (kernel $kernel_release; modules: ${load_order[*]})"
