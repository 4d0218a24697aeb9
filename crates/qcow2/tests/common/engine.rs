//! The few calls into our engine that every test repeats, kept in one place.

use std::path::Path;

use vmsnap_qcow2::{BackingPolicy, Compat, CreateOptions, ImageFormat, OpenOptions, Qcow2Image};

/// The qcow2 layout a test image is created with.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub size: u64,
    pub cluster_size: u32,
    pub compat: Compat,
    pub refcount_bits: u32,
}

impl Layout {
    /// The `-o` option string giving `qemu-img create/convert` the same layout.
    pub fn qemu_options(&self) -> String {
        let compat = match self.compat {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        };
        format!(
            "cluster_size={},compat={},refcount_bits={}",
            self.cluster_size, compat, self.refcount_bits
        )
    }
}

/// Creates a qcow2 image through our engine.
pub fn create_qcow2(path: &Path, layout: &Layout) {
    let options = CreateOptions {
        size: layout.size,
        cluster_size: layout.cluster_size,
        compat: layout.compat,
        refcount_bits: layout.refcount_bits,
        backing: None,
    };
    vmsnap_qcow2::create(path, ImageFormat::Qcow2, &options)
        .unwrap_or_else(|e| panic!("create {} ({layout:?}): {e}", path.display()));
}

/// Opens an image as told, for tests that expect (or tolerate) a refusal.
pub fn try_open(
    path: &Path,
    writable: bool,
    backing: BackingPolicy,
) -> vmsnap_qcow2::Result<Qcow2Image> {
    Qcow2Image::open(path, OpenOptions { writable, backing })
}

/// Opens an image read-write, following a backing file only if its header names the format.
pub fn open_rw(path: &Path) -> Qcow2Image {
    Qcow2Image::open(
        path,
        OpenOptions {
            writable: true,
            backing: BackingPolicy::FromHeader,
        },
    )
    .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

/// Opens an image read-only, following a backing file only if its header names the format.
pub fn open_ro(path: &Path) -> Qcow2Image {
    Qcow2Image::open(
        path,
        OpenOptions {
            writable: false,
            backing: BackingPolicy::FromHeader,
        },
    )
    .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()))
}

/// Reads `len` guest bytes from `offset`.
pub fn read(image: &mut Qcow2Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xa5; len];
    image
        .read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("engine read of {len} bytes at {offset:#x}: {e}"));
    buf
}

/// Reads the whole guest disk through our engine, in pieces a few clusters long.
pub fn read_all(image: &mut Qcow2Image, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(size).expect("size fits memory"));
    let chunk = 1 << 20;
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset) as usize;
        out.extend_from_slice(&read(image, offset, len));
        offset += len as u64;
    }
    out
}
