#!/usr/bin/env bash
# Benchmark (not a timed test): how long an external memory+disk snapshot by
# vmsnap pauses the guest, against QEMU's own `snapshot-save` measured in the
# same run on the same VM.
#
# The VM: the test guest (TCG) with 1 GiB of RAM and a 1 GiB qcow2 disk. Its
# initramfs carries an extra 420 MiB file of random bytes, so once booted
# over 512 MiB of guest RAM is non-zero (the unpacked copy, the kernel and
# the rest; the kernel gives the loaded archive back) and a memory save has
# real pages to write.
#
# Two such VMs run one after the other: one with `hugepages = true` (guest
# RAM from the host's 2 MiB huge page pool; the script grows the pool by
# what is missing, root only) and one with plain anonymous RAM, the default.
# QEMU 7.2's background snapshot walks and write-protects guest RAM page by
# page inside the pause: 512 steps per GiB with huge pages, 262,144 without.
# For anonymous RAM vmsnap folds the guest's RAM back into transparent huge
# pages before each snapshot, outside the pause, which shortens the walk.
#
# Pause = QMP STOP to RESUME event timestamps (QEMU's own clock), as
# `snapshot-create-as --json` reports it in `pause_ms`: for the external
# snapshot vmsnap's stop / disk switch / background memory save; for the
# internal one QEMU's `snapshot-save` job, which vmsnap runs as is. Rounds
# alternate the two on one VM. Every round is checked: the JSON names the
# snapshot and its kind, pause_ms is a number, the external memory image and
# the internal vmstate are each at least 512 MiB (so the RAM really was
# dirty). Prints every pause, the medians and the ratios (target: vmsnap's
# median <= 5 ms).
#
# Usage: scripts/bench-snapshot.sh [ROUNDS]
#        (default 5 rounds per VM; needs guest/out, see guest/README.md)
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
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
vmsnap=$target_dir/release/vmsnap

work=$(mktemp -d /tmp/vmsnap-bench.XXXXXX)
export VMSNAP_STATE_DIR=$work/state
cleanup() {
    "$vmsnap" destroy bench >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "bench-snapshot: preparing a 1 GiB guest with 420 MiB of random bytes in its initramfs"
mkdir "$work/dirt"
head -c 420M /dev/urandom >"$work/dirt/dirt.bin"
(cd "$work/dirt" && echo dirt.bin | cpio --quiet -o -H newc) >"$work/dirt.cpio"
cat guest/out/initrd.img "$work/dirt.cpio" >"$work/initrd.img"
rm -rf "$work/dirt" "$work/dirt.cpio"

echo "bench-snapshot: $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-system-x86_64 --version | head -1), vmsnap built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' plus uncommitted changes in crates/')"

fail() { echo "bench-snapshot: $*" >&2; exit 1; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
min_dirty=$((512 * 1024 * 1024))
summary=()

# bench_vm LABEL HUGEPAGES: boots the VM, runs the rounds, adds its lines
# to the summary.
bench_vm() {
    local label=$1 hugepages=$2
    rm -f "$work/vda.qcow2"
    qemu-img create -q -f qcow2 "$work/vda.qcow2" 1G
    cat >"$work/bench.toml" <<TOML
name = "bench"
memory_mib = 1024
hugepages = $hugepages
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
    local serial=$VMSNAP_STATE_DIR/domains/bench/serial.log
    for _ in $(seq 1 240); do
        grep -q 'vmsnap-guest: ready' "$serial" 2>/dev/null && break
        sleep 0.5
    done
    grep -q 'vmsnap-guest: ready' "$serial" || fail "the $label guest did not boot"

    echo
    echo "$label:"
    local external=() internal=() fallback="" i out pause memfile memsize top vmstate
    for i in $(seq 1 "$rounds"); do
        out=$("$vmsnap" snapshot-create-as bench "ext$i" --external --json)
        [ "$(jq -r '.name + " " + .kind' <<<"$out")" = "ext$i external" ] || fail "unexpected reply to ext$i: $out"
        pause=$(jq -r '.pause_ms | numbers' <<<"$out")
        [ -n "$pause" ] || fail "no pause_ms for ext$i: $out"
        external+=("$pause")
        [ "$(jq -r '.background' <<<"$out")" = true ] || fallback=" (background-snapshot refused: paused save)"
        memfile=$(find "$work" -name "ext$i*.mem" -print -quit)
        [ -n "$memfile" ] || fail "no memory image for ext$i under $work"
        memsize=$(stat -c %s "$memfile")
        [ "$memsize" -ge "$min_dirty" ] || fail "ext$i's memory image is $memsize bytes: the guest's RAM is not 512 MiB dirty"
        rm -f "$memfile"  # keeps the disk from filling up; the bench never reverts

        out=$("$vmsnap" snapshot-create-as bench "int$i" --json)
        [ "$(jq -r '.name' <<<"$out")" = "int$i" ] || fail "unexpected reply to int$i: $out"
        pause=$(jq -r '.pause_ms | numbers' <<<"$out")
        [ -n "$pause" ] || fail "no pause_ms for int$i: $out"
        internal+=("$pause")
        top=$("$vmsnap" domblklist bench --json | jq -r '.[0].source')
        vmstate=$(qemu-img info -U --output=json "$top" \
            | jq -r --arg t "int$i" '.snapshots[] | select(.name == $t) | ."vm-state-size"')
        [ "${vmstate:-0}" -ge "$min_dirty" ] || fail "int$i's vmstate in $top is ${vmstate:-no} bytes: not a 512 MiB dirty RAM"
        printf '  round %d: vmsnap external %8.2f ms (memory image %d MiB)   QEMU snapshot-save %8.2f ms (vmstate %d MiB)\n' \
            "$i" "${external[-1]}" $((memsize >> 20)) "${internal[-1]}" $((vmstate >> 20))
    done
    "$vmsnap" destroy bench >/dev/null
    "$vmsnap" undefine bench --snapshots-metadata >/dev/null
    rm -f "$work"/*.qcow2

    local ext_median int_median
    ext_median=$(median "${external[@]}")
    int_median=$(median "${internal[@]}")
    summary+=("$(printf '%s:\n  vmsnap external memory+disk snapshot%s: median pause %.2f ms (of %d; target <= 5 ms: %s)' \
        "$label" "$fallback" "$ext_median" "$rounds" "$(awk -v m="$ext_median" 'BEGIN { print (m <= 5) ? "met" : "MISSED" }')")")
    summary+=("$(printf "  QEMU's own snapshot-save (internal):     median pause %.2f ms (of %d)" "$int_median" "$rounds")")
    summary+=("$(awk -v a="$int_median" -v b="$ext_median" 'BEGIN { if (b > 0) printf "  ratio: vmsnap/QEMU %.4f (QEMU snapshot-save pauses the guest %.1fx longer)", b / a, a / b }')")
}

if scripts/hugepage-pool.sh 512; then
    bench_vm "guest RAM in 2 MiB huge pages (hugepages = true)" true
else
    summary+=("guest RAM in 2 MiB huge pages: not measured, the huge page pool is short (see above)")
fi
bench_vm "anonymous guest RAM (the default)" false

echo
printf '%s\n' "${summary[@]}"
