#!/usr/bin/env bash
# Benchmark (not a test): `vmsnap img snapshot -c/-a/-d` and `vmsnap img check` against
# the same qemu-img commands, on a 1 GiB qcow2 image with 4 KiB clusters whose every
# cluster is written (262,144 data clusters). Each command runs RUNS times (default 5),
# qemu-img and vmsnap alternating so a busy machine slows both alike, every time on a
# fresh copy of the image (copied, written back with sync so no writeback lands in the
# timed window, then read once by `cat` so the page cache is equally warm for both
# tools). Every timed run is verified afterwards (outside the timing). Reported: the
# median wall time of each tool, the ratio vmsnap/qemu-img (target: <= 0.5), and the
# median CPU time (user+sys) ratio, which a loaded machine disturbs less.
#
# Usage: [RUNS=N] scripts/bench-img.sh [WORKDIR]   (default: a temp dir; needs ~3 GiB free)
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/setup.sh" >&2; exit 1; }
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p vmsnap --quiet
VMSNAP="$CARGO_TARGET_DIR/release/vmsnap"

WORK="${1:-$(mktemp -d /tmp/vmsnap-bench.XXXXXX)}"
mkdir -p "$WORK"
trap 'rm -f "$WORK"/run.qcow2' EXIT
RUNS=${RUNS:-5}

MASTER="$WORK/master.qcow2"        # fully written, no snapshot
MASTER_SNAP="$WORK/master-snap.qcow2"  # the same plus snapshot "s1" and a rewrite of 64 MiB
if [[ ! -f "$MASTER" ]]; then
    echo "making $MASTER (1 GiB, 4 KiB clusters, fully written) ..." >&2
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$MASTER" 1G
    qemu-io -f qcow2 -c 'write -P 1 0 1G' "$MASTER" >/dev/null
fi
if [[ ! -f "$MASTER_SNAP" ]]; then
    cp "$MASTER" "$MASTER_SNAP"
    qemu-img snapshot -c s1 "$MASTER_SNAP"
    qemu-io -f qcow2 -c 'write -P 2 0 64M' "$MASTER_SNAP" >/dev/null
fi

# fresh_copy SRC: copies SRC to run.qcow2 and warms the page cache with it.
fresh_copy() {
    rm -f "$WORK/run.qcow2"
    cp "$1" "$WORK/run.qcow2"
    sync "$WORK/run.qcow2"
    cat "$WORK/run.qcow2" >/dev/null
}

# verify_result KIND: after a timed run, proves the command did its job on run.qcow2
# (outside the timing): the image checks clean and the snapshot table is as expected.
verify_result() {
    local img="$WORK/run.qcow2" list
    qemu-img check -q "$img" || { echo "VERIFY FAILED: qemu-img check after $1" >&2; return 1; }
    list=$(qemu-img snapshot -l "$img")
    case "$1" in
        create) grep -qw s2 <<<"$list" ;;
        apply) [[ "$(qemu-io -f qcow2 -r -c 'read -P 1 0 64M' "$img")" != *"verification failed"* ]] ;;
        delete) ! grep -qw s1 <<<"$list" ;;
        check) true ;;
    esac || { echo "VERIFY FAILED: $1 did not take effect" >&2; return 1; }
}

# time_once KIND SRC CMD...: "WALL CPU" seconds taken by CMD (CPU = user + sys of
# the command and its children) on a fresh copy of SRC (placeholder IMG), verified
# afterwards; "nan nan" when the command failed or did not do its job.
time_once() {
    local kind="$1" src="$2"; shift 2
    fresh_copy "$src"
    local args=()
    for a in "$@"; do args+=("${a//IMG/$WORK/run.qcow2}"); done
    local status times wall user sys
    set +e
    times=$( { TIMEFORMAT='%R %U %S'; time "${args[@]}" >/dev/null 2>"$WORK/stderr"; } 2>&1 )
    status=$?
    set -e
    # qemu-img check exits 0 on a clean image; anything else means the command did not do its job.
    if [[ $status -ne 0 ]]; then
        echo "FAILED ($status): ${args[*]}: $(head -c 300 "$WORK/stderr")" >&2
        echo "nan nan"
        return
    fi
    verify_result "$kind" >&2 || { echo "nan nan"; return; }
    read -r wall user sys <<<"$times"
    echo "$wall $(echo "$user + $sys" | bc -l)"
}

# med VALUES...: the median (the middle one of an odd count; nan if any is nan).
med() {
    local sorted
    sorted=$(printf '%s\n' "$@" | sort -g)
    if grep -q nan <<<"$sorted"; then echo nan; return; fi
    sed -n "$(( ($# + 1) / 2 ))p" <<<"$sorted"
}

ratio() { if [[ "$1" == nan || "$2" == nan ]]; then echo nan; else echo "$1 / $2" | bc -l; fi; }

echo "vmsnap: $VMSNAP ($(file -b "$VMSNAP" | cut -d, -f1-2), built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' plus uncommitted changes in crates/')); $(qemu-img --version | head -1); runs: $RUNS; $(date -u '+%F %T UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-12s %10s %10s %7s   %10s %10s %7s   %s\n' "operation" "qemu-img s" "vmsnap s" "ratio" \
    "qemu cpu s" "ours cpu s" "ratio" "target ratio <= 0.5 (wall)"
# row NAME KIND SRC QEMU_CMD OURS_CMD: times both commands RUNS times, alternating.
row() {
    local name="$1" kind="$2" src="$3" qemu_cmd="$4" ours_cmd="$5"
    local qw=() qc=() ow=() oc=() w c
    for _ in $(seq "$RUNS"); do
        # shellcheck disable=SC2086
        read -r w c <<<"$(time_once "$kind" "$src" $qemu_cmd)"; qw+=("$w"); qc+=("$c")
        # shellcheck disable=SC2086
        read -r w c <<<"$(time_once "$kind" "$src" $ours_cmd)"; ow+=("$w"); oc+=("$c")
    done
    echo "  $name runs (wall s): qemu-img ${qw[*]}; vmsnap ${ow[*]}" >&2
    local q o r cq co cr verdict
    q=$(med "${qw[@]}"); o=$(med "${ow[@]}"); r=$(ratio "$o" "$q")
    cq=$(med "${qc[@]}"); co=$(med "${oc[@]}"); cr=$(ratio "$co" "$cq")
    if [[ "$r" == nan ]]; then verdict=FAILED
    elif [[ $(echo "$r <= 0.5" | bc -l) == 1 ]]; then verdict=met
    else verdict=MISSED; fi
    printf '%-12s %10.3f %10.3f %7.2f   %10.3f %10.3f %7.2f   %s\n' "$name" "$q" "$o" "$r" "$cq" "$co" "$cr" "$verdict" 2>/dev/null \
        || printf '%-12s %10s %10s %7s   %10s %10s %7s   %s\n' "$name" "$q" "$o" "$r" "$cq" "$co" "$cr" "$verdict"
}

row "snapshot -c" create "$MASTER"      "qemu-img snapshot -c s2 IMG" "$VMSNAP img snapshot -c s2 IMG"
row "snapshot -a" apply  "$MASTER_SNAP" "qemu-img snapshot -a s1 IMG" "$VMSNAP img snapshot -a s1 IMG"
row "snapshot -d" delete "$MASTER_SNAP" "qemu-img snapshot -d s1 IMG" "$VMSNAP img snapshot -d s1 IMG"
row "check"       check  "$MASTER_SNAP" "qemu-img check IMG"          "$VMSNAP img check IMG"
echo "images in $WORK (master images are kept for reruns; delete the directory when done)" >&2
