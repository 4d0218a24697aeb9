//! Driver for the vmsnap test guest, used by integration tests.
//!
//! The test guest (built by guest/build.sh into guest/out) is a Debian cloud
//! kernel with a busybox initramfs whose init serves a line protocol on the
//! VM's second serial port (guest/README.md). Through it a test writes known
//! data to the guest's disks, keeps a value in its RAM, and reads both back,
//! which is how snapshot and crash tests check that disk and memory agree.
//!
//! * [`Guest`]: the synchronous client of that protocol, safe to reconnect
//!   after a memory revert.
//! * [`pattern_bytes`], [`pattern_checksum`]: the host-side view of what
//!   [`Guest::write_pattern`] writes, to compare with an image read on the host.
//! * [`QemuGuest`]: starts QEMU with the guest's command-line contract, for
//!   tests that have no domain layer; kills it on drop.
//! * [`lab`]: the harness the core and CLI integration tests share (domain
//!   configs for the guest, qemu-img/qemu-io checks, a `vmsnap` runner).

#![warn(missing_docs)]

mod error;
mod guest;
pub mod lab;
mod pattern;
mod qemu;
pub mod rng;

use std::path::PathBuf;

pub use error::{Error, ErrorKind};
pub use guest::{Guest, GuestDisk, DEFAULT_CALL_TIMEOUT, MAX_RAM_VALUE_LEN};
pub use pattern::{pattern_bytes, pattern_checksum, sha256_hex, SECTOR};
pub use qemu::{DiskFormat, QemuGuest, QemuGuestBuilder, GUEST_KERNEL_CMDLINE};

/// Environment variable overriding where the built guest lives (defaults to
/// the workspace's guest/out).
pub const GUEST_DIR_ENV: &str = "VMSNAP_GUEST_DIR";

/// Directory holding the built guest: `$VMSNAP_GUEST_DIR`, else guest/out of
/// this workspace.
pub fn guest_out_dir() -> PathBuf {
    match std::env::var_os(GUEST_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"),
    }
}

/// The guest kernel (guest/out/vmlinuz); fails with "run scripts/setup.sh"
/// when it has not been built.
pub fn guest_kernel() -> Result<PathBuf, Error> {
    built_file("vmlinuz")
}

/// The guest initramfs (guest/out/initrd.img); fails with "run
/// scripts/setup.sh" when it has not been built.
pub fn guest_initrd() -> Result<PathBuf, Error> {
    built_file("initrd.img")
}

fn built_file(name: &str) -> Result<PathBuf, Error> {
    let path = guest_out_dir().join(name);
    if path.is_file() {
        Ok(path.canonicalize().unwrap_or(path))
    } else {
        Err(Error::GuestNotBuilt { path })
    }
}
