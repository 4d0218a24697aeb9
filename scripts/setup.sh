#!/usr/bin/env bash
# Installs what vmsnap's demo and tests need on a fresh Debian 12 machine:
# QEMU 7.2 (system emulator and qemu-img/qemu-io, installed together so the
# distribution's qemu-utils replaces any backport), busybox for the test guest,
# xmllint and libvirt's schemas (libvirt0) to validate our snapshot XML,
# strace (the crash tests kill vmsnap at its N-th write with fault injection),
# and builds the test guest (kernel + initramfs) under guest/out.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() { [ "$(id -u)" = 0 ] || { echo "setup: run as root (or with sudo): it installs apt packages" >&2; exit 1; }; }

want_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 \
        && qemu-img --version 2>/dev/null | grep -q 'version 7\.2' \
        && command -v busybox >/dev/null 2>&1 && command -v cpio >/dev/null 2>&1 \
        && command -v xmllint >/dev/null 2>&1 && command -v strace >/dev/null 2>&1 \
        && [ -f /usr/share/libvirt/schemas/domainsnapshot.rng ]
}

if ! want_qemu; then
    need_root
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # qemu-utils/bookworm: a preinstalled qemu-utils backport would otherwise hold
    # qemu-system-x86 back (DESIGN §7); both must come from the same release.
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
        qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm \
        busybox-static cpio xz-utils zstd \
        libxml2-utils libvirt0 strace >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
    exit 1
fi

if [ -x guest/build.sh ]; then
    guest/build.sh
fi
