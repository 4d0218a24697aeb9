#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (QEMU 7.2, the test guest) and runs every
# test: formatting, lints, unit tests and the integration tests against real
# qemu-system-x86_64 / qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setup.sh may have installed cargo through rustup.
export PATH="$HOME/.cargo/bin:$PATH"
# The hugepage-backed guest (crates/cli/tests/hugepage_memory.rs) takes its
# 160 MiB of RAM from the host's 2 MiB huge page pool: make room for it.
scripts/hugepage-pool.sh 128 || echo "test: hugepage_memory will fail: the huge page pool is short" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast
