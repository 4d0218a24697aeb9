#!/usr/bin/env bash
# The main job, for a newcomer: sets up the machine, builds vmsnap and shows
# qcow2 internal snapshots being taken, listed, applied and deleted by vmsnap's
# own engine, with qemu-img checking every step.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet -p vmsnap
vmsnap=target/release/vmsnap
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/demo.qcow2

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step $vmsnap img create -f qcow2 -o cluster_size=65536 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' "$img" >/dev/null
step $vmsnap img snapshot -c first "$img"
qemu-io -f qcow2 -c 'write -P 0x22 0 4M' "$img" >/dev/null
step $vmsnap img snapshot -c second "$img"
step $vmsnap img snapshot -l "$img"
step $vmsnap img snapshot -a first "$img"
step qemu-io -f qcow2 -c 'read -P 0x11 0 4M' "$img"
step $vmsnap img snapshot -d second "$img"
step $vmsnap img check "$img"
step qemu-img check "$img"
step $vmsnap img info "$img"
