#!/usr/bin/env bash
# Benchmark (not a timed test): how long an external memory+disk snapshot by
# vmsnap pauses the guest, against QEMU's own `snapshot-save` measured in the
# same run on the same VM.
#
# The VM: the test guest (TCG) with 1 GiB of RAM and a 1 GiB qcow2 disk. Its
# initramfs carries an extra 256 MiB file of random bytes, so once booted
# well over 512 MiB of guest RAM is non-zero (the loaded archive plus the
# unpacked copy) and a memory save has real pages to write.
#
# Pause = QMP STOP to RESUME event timestamps, as `snapshot-create-as --json`
# reports it in `pause_ms`. Prints every pause, the medians of 5 and the ratio.
#
# Usage: scripts/bench-snapshot.sh [ROUNDS]   (default 5; needs guest/out, see guest/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}

for tool in jq cpio qemu-img qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "bench-snapshot: $tool is needed" >&2; exit 1; }
done
[ -f guest/out/vmlinuz ] && [ -f guest/out/initrd.img ] || {
    echo "bench-snapshot: build the test guest first (guest/build.sh)" >&2; exit 1; }

cargo build --release --quiet -p vmsnap
target_dir=${CARGO_TARGET_DIR:-target}
vmsnap=$PWD/$target_dir/release/vmsnap
[ -x "$vmsnap" ] || vmsnap=$target_dir/release/vmsnap

work=$(mktemp -d /tmp/vmsnap-bench.XXXXXX)
export VMSNAP_STATE_DIR=$work/state
cleanup() {
    "$vmsnap" destroy bench >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "bench-snapshot: preparing a 1 GiB guest with 256 MiB of random bytes in its initramfs"
mkdir "$work/dirt"
head -c 256M /dev/urandom >"$work/dirt/dirt.bin"
(cd "$work/dirt" && echo dirt.bin | cpio --quiet -o -H newc) >"$work/dirt.cpio"
cat guest/out/initrd.img "$work/dirt.cpio" >"$work/initrd.img"
rm -rf "$work/dirt" "$work/dirt.cpio"
qemu-img create -q -f qcow2 "$work/vda.qcow2" 1G
cat >"$work/bench.toml" <<TOML
name = "bench"
memory_mib = 1024
vcpus = 1
accel = "tcg"
kernel = "$PWD/guest/out/vmlinuz"
initrd = "$work/initrd.img"
cmdline = "console=ttyS0 panic=-1"
qemu_args = ["-no-reboot", "-chardev", "socket,id=ctl,path=$work/ctl.sock,server=on,wait=off", "-device", "isa-serial,chardev=ctl"]

[[disk]]
target = "vda"
file = "vda.qcow2"
format = "qcow2"
TOML
"$vmsnap" define "$work/bench.toml" >/dev/null
"$vmsnap" start bench >/dev/null
serial=$VMSNAP_STATE_DIR/domains/bench/serial.log
for _ in $(seq 1 240); do
    grep -q 'vmsnap-guest: ready' "$serial" 2>/dev/null && break
    sleep 0.5
done
grep -q 'vmsnap-guest: ready' "$serial" || { echo "bench-snapshot: the guest did not boot" >&2; exit 1; }

external=()
internal=()
fallback=""
for i in $(seq 1 "$rounds"); do
    out=$("$vmsnap" snapshot-create-as bench "ext$i" --external --json)
    external+=("$(jq -r '.pause_ms' <<<"$out")")
    [ "$(jq -r '.background' <<<"$out")" = true ] || fallback=" (background-snapshot refused: paused save)"
    out=$("$vmsnap" snapshot-create-as bench "int$i" --json)
    internal+=("$(jq -r '.pause_ms' <<<"$out")")
    printf 'round %d: vmsnap external %8.2f ms   QEMU snapshot-save %8.2f ms\n' \
        "$i" "${external[-1]}" "${internal[-1]}"
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ext_median=$(median "${external[@]}")
int_median=$(median "${internal[@]}")
echo
printf 'vmsnap external memory+disk snapshot%s: median pause %.2f ms (of %d)\n' "$fallback" "$ext_median" "$rounds"
printf "QEMU's own snapshot-save (internal):     median pause %.2f ms (of %d)\n" "$int_median" "$rounds"
awk -v a="$int_median" -v b="$ext_median" 'BEGIN { if (b > 0) printf "ratio: QEMU snapshot-save pauses the guest %.1fx longer\n", a / b }'
