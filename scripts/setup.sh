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
export DEBIAN_FRONTEND=noninteractive
apt_updated=
apt_install() {
    need_root
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

want_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 \
        && qemu-img --version 2>/dev/null | grep -q 'version 7\.2' \
        && command -v busybox >/dev/null 2>&1 && command -v cpio >/dev/null 2>&1 \
        && command -v xmllint >/dev/null 2>&1 && command -v strace >/dev/null 2>&1 \
        && [ -f /usr/share/libvirt/schemas/domainsnapshot.rng ]
}

if ! want_qemu; then
    # qemu-utils/bookworm: a preinstalled qemu-utils backport would otherwise hold
    # qemu-system-x86 back (DESIGN §7); both must come from the same release.
    apt_install --allow-downgrades \
        qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm \
        busybox-static cpio xz-utils zstd \
        libxml2-utils libvirt0 strace
fi

# The Rust toolchain: Debian 12's own cargo (1.63) is too old for the
# workspace, so a machine without one gets the current stable through rustup,
# with the C compiler that bundled SQLite and zstd need.
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: no cargo on this machine: installing the stable Rust toolchain with rustup" >&2
    apt_install curl ca-certificates gcc libc6-dev
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --profile minimal --component clippy,rustfmt >/dev/null
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev

if [ -x guest/build.sh ]; then
    guest/build.sh
fi
