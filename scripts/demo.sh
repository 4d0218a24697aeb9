#!/usr/bin/env bash
# The main job, for a newcomer: sets up the machine (QEMU 7.2, the test guest),
# builds vmsnap, then defines and starts a small VM in the default state
# directory, takes an internal and an external whole-VM snapshot, reverts to
# each, shows that the guest's RAM and disk came back, and prints the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setup.sh may have installed cargo through rustup.
export PATH="$HOME/.cargo/bin:$PATH"
echo "building vmsnap (release)…"
cargo build --release --quiet -p vmsnap -p vmsnap-testguest --bin vmsnap --bin guestctl
bin=$PWD/target/release
PATH=$bin:$PATH

demo_dir=${VMSNAP_DEMO_DIR:-/var/tmp/vmsnap-demo}
dom=demo
ctl=$demo_dir/ctl.sock

# A previous run's domain goes first, with its snapshots' files.
if vmsnap dominfo "$dom" >/dev/null 2>&1; then
    vmsnap destroy "$dom" >/dev/null 2>&1 || true
    vmsnap undefine "$dom" --snapshots-metadata >/dev/null
fi
rm -rf "$demo_dir"
mkdir -p "$demo_dir"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
note() { printf '\033[2m# %s\033[0m\n' "$*"; }
# Checks the guest's RAM value and disk checksum against what they were at a snapshot.
verify() {
    local snapshot=$1 value=$2 sum=$3
    local got_value got_sum
    got_value=$(guestctl "$ctl" get)
    got_sum=$(guestctl "$ctl" sum vda 0 1048576)
    if [ "$got_value" != "$value" ] || [ "$got_sum" != "$sum" ]; then
        echo "demo: after reverting to $snapshot the guest has '$got_value' (wanted '$value') and disk sum $got_sum (wanted $sum)" >&2
        exit 1
    fi
    note "$snapshot: the guest's RAM value '$got_value' and disk checksum are exactly as they were at $snapshot"
}

qemu-img create -q -f qcow2 "$demo_dir/vda.qcow2" 256M
cat > "$demo_dir/$dom.toml" <<TOML
name = "$dom"
memory_mib = 256
vcpus = 1
accel = "tcg"
kernel = "$PWD/guest/out/vmlinuz"
initrd = "$PWD/guest/out/initrd.img"
cmdline = "console=ttyS0 panic=-1"
qemu_args = ["-chardev", "socket,id=ctl,path=$ctl,server=on,wait=off", "-device", "isa-serial,chardev=ctl"]

[[disk]]
target = "vda"
file = "vda.qcow2"
format = "qcow2"
TOML

start=$(date +%s)
step vmsnap define "$demo_dir/$dom.toml"
step vmsnap start "$dom"
note "the guest keeps a value in RAM and writes a pattern to its disk"
step guestctl "$ctl" set "state-one"
step guestctl "$ctl" write vda 0 1048576 1
sum_one=$(guestctl "$ctl" sum vda 0 1048576)

step vmsnap snapshot-create-as "$dom" s1 "internal: memory and disk inside the qcow2"
step guestctl "$ctl" set "state-two"
step guestctl "$ctl" write vda 0 1048576 2
sum_two=$(guestctl "$ctl" sum vda 0 1048576)

step vmsnap snapshot-create-as "$dom" s2 "external: overlay plus memory file" --external
step guestctl "$ctl" set "state-three"
step guestctl "$ctl" write vda 0 1048576 3

step vmsnap snapshot-revert "$dom" s1
verify s1 state-one "$sum_one"

step vmsnap snapshot-revert "$dom" s2
verify s2 state-two "$sum_two"

step vmsnap snapshot-list "$dom"
step vmsnap snapshot-list "$dom" --tree
step vmsnap snapshot-info "$dom" s2
step vmsnap destroy "$dom"
note "done in $(( $(date +%s) - start )) s; the domain '$dom' stays defined: try 'vmsnap snapshot-list $dom --tree' or 'vmsnap start $dom'"
