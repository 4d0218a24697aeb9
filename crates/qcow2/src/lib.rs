//! The qcow2 engine: images over files, guest I/O, internal snapshots,
//! check and repair, create, commit and rebase.
//!
//! Built on `vmsnap-qcow2-format` (pure decode/encode). Writes follow QEMU's
//! ordering rules so that a crash at any point leaves an image `qemu-img check`
//! accepts (leaks allowed). Images are locked the way QEMU locks them, so a
//! running QEMU and this engine never write one image at once.

mod check;
mod disk;
mod error;
mod image;
mod lock;
mod ops;
mod snapshot;

pub use check::{CheckReport, RepairMode};
pub use disk::{
    detect_format, open_disk, resolve_backing_path, BackingFile, Disk, ImageFormat, RawImage,
};
pub use error::{Error, ErrorKind, Result};
pub use image::{BackingPolicy, Compat, ImageInfo, OpenOptions, Qcow2Image, SnapshotInfo};
pub use ops::{commit, create, rebase, CommitReport, CreateOptions};

#[cfg(test)]
mod tests;
