#!/usr/bin/env bash
# Benchmark (not a test): `vmsnap img snapshot -c/-a/-d` and `vmsnap img check` against
# the same qemu-img commands, on a 1 GiB qcow2 image with 4 KiB clusters whose every
# cluster is written (262,144 data clusters). Each command runs 3 times on a fresh copy
# of the image (the copy is made, then read once by `cat` so the page cache is equally
# warm for both tools) and the median wall time is reported, with the ratio
# vmsnap/qemu-img (target: <= 0.5).
#
# Usage: scripts/bench-img.sh [WORKDIR]   (default: a temp dir; needs ~3 GiB free)
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
RUNS=3

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
    cp "$1" "$WORK/run.qcow2"
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

# time_once KIND SRC CMD...: seconds taken by CMD on a fresh copy of SRC (placeholder
# IMG), verified afterwards.
time_once() {
    local kind="$1" src="$2"; shift 2
    fresh_copy "$src"
    local args=()
    for a in "$@"; do args+=("${a//IMG/$WORK/run.qcow2}"); done
    local start end status
    start=$(date +%s.%N)
    set +e
    "${args[@]}" >/dev/null 2>"$WORK/stderr"
    status=$?
    set -e
    end=$(date +%s.%N)
    # qemu-img check exits 0 here; anything else means the command did not do its job.
    if [[ $status -ne 0 ]]; then
        echo "FAILED ($status): ${args[*]}: $(head -c 300 "$WORK/stderr")" >&2
        echo "nan"
        return
    fi
    verify_result "$kind" >&2 || { echo "nan"; return; }
    echo "$end - $start" | bc -l
}

# median KIND SRC CMD...: median of $RUNS runs.
median() {
    local times=()
    for _ in $(seq "$RUNS"); do times+=("$(time_once "$@")"); done
    printf '%s\n' "${times[@]}" | sort -g | sed -n "$(( (RUNS + 1) / 2 ))p"
}

printf '%-22s %12s %12s %8s\n' "operation" "qemu-img s" "vmsnap s" "ratio"
row() {
    local name="$1" kind="$2" src="$3" qemu_cmd="$4" ours_cmd="$5"
    local q o ratio
    # shellcheck disable=SC2086
    q=$(median "$kind" "$src" $qemu_cmd)
    # shellcheck disable=SC2086
    o=$(median "$kind" "$src" $ours_cmd)
    if [[ "$q" == nan || "$o" == nan ]]; then ratio=nan; else ratio=$(echo "$o / $q" | bc -l); fi
    printf '%-22s %12.3f %12.3f %8.2f\n' "$name" "$q" "$o" "$ratio" 2>/dev/null \
        || printf '%-22s %12s %12s %8s\n' "$name" "$q" "$o" "$ratio"
}

row "snapshot -c" create "$MASTER"      "qemu-img snapshot -c s2 IMG" "$VMSNAP img snapshot -c s2 IMG"
row "snapshot -a" apply  "$MASTER_SNAP" "qemu-img snapshot -a s1 IMG" "$VMSNAP img snapshot -a s1 IMG"
row "snapshot -d" delete "$MASTER_SNAP" "qemu-img snapshot -d s1 IMG" "$VMSNAP img snapshot -d s1 IMG"
row "check"       check  "$MASTER_SNAP" "qemu-img check IMG"          "$VMSNAP img check IMG"
echo "images in $WORK (master images are kept for reruns; delete the directory when done)" >&2
