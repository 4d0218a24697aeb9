#!/usr/bin/env bash
# Makes the seed corpora for the fuzz targets from small images qemu-img/qemu-io write:
# v2 and v3, 512 B to 64 KiB clusters, 1/16/64-bit refcounts, snapshots, zero and
# compressed (zlib, zstd) clusters, a backing file, lazy refcounts.
# Usage: fuzz/make-seeds.sh   (then: cargo +nightly fuzz run -O parse_image corpus/parse_image)
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
io() { qemu-io -f qcow2 "$@" >/dev/null; }
cd "$work"
qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 1M
io -c 'write -P 1 0 4k' -c 'write -c -P 2 8k 512' a.qcow2
qemu-img snapshot -c s1 a.qcow2
io -c 'write -z 0 1k' a.qcow2
qemu-img snapshot -c second a.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 b.qcow2 1M
io -c 'write -P 1 0 4k' b.qcow2
qemu-img snapshot -c s1 b.qcow2
qemu-img create -q -f qcow2 -o cluster_size=1024,refcount_bits=1 c.qcow2 1M
io -c 'write -P 1 0 4k' c.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64,compression_type=zstd \
    -b a.qcow2 -F qcow2 d.qcow2 1M
io -c 'write -c -P 3 0 512' d.qcow2
qemu-img create -q -f qcow2 e.qcow2 64M
qemu-img create -q -f qcow2 -o lazy_refcounts=on f.qcow2 1M
cd - >/dev/null
for target in parse_image open_image snapshot_ops; do
    mkdir -p "corpus/$target"
    for image in "$work"/*.qcow2; do
        head -c 262144 "$image" > "corpus/$target/seed-$(basename "$image")"
    done
done
echo "seeds in $(pwd)/corpus"
