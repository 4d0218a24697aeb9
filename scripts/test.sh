#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (QEMU 7.2, the test guest) and runs every
# test: formatting, lints, unit tests and the integration tests against real
# qemu-system-x86_64 / qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setup.sh may have installed cargo through rustup.
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast
