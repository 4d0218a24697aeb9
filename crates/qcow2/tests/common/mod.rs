//! Helpers shared by the engine's integration tests: `qemu-img`/`qemu-io` as the oracle,
//! a byte model of a disk and its snapshots, and raw header peeking/poking.
//!
//! Every test binary compiles this module but uses a different part of it.
#![allow(dead_code)]

pub mod engine;
pub mod model;
pub mod oracle;
pub mod raw;

use std::path::{Path, PathBuf};

/// A private temporary directory for one test's images, removed when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Makes a fresh directory under the system temp dir.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-qcow2-test-")
            .tempdir()
            .expect("create a temporary directory for test images");
        Scratch { dir }
    }

    /// A path for a file named `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Compares two byte buffers and, on mismatch, panics with the first differing offset and
/// the number of differing bytes (printing megabytes of `assert_eq!` output helps no one).
pub fn assert_same_bytes(expected: &[u8], actual: &[u8], what: &str) {
    if expected.len() != actual.len() {
        panic!(
            "{what}: length differs: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        );
    }
    if expected == actual {
        return;
    }
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let differing = expected.iter().zip(actual).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(expected.len());
    panic!(
        "{what}: {differing} bytes differ, first at offset {first:#x}: expected {:02x?}, got {:02x?}",
        &expected[first..end],
        &actual[first..end]
    );
}

/// Requires our engine's view of the first `size` guest bytes of `image` to be `expected`.
pub fn assert_engine_view(
    image: &mut vmsnap_qcow2::Qcow2Image,
    size: u64,
    expected: &[u8],
    what: &str,
) {
    assert_same_bytes(expected, &engine::read_all(image, size), what);
}

/// Requires our engine's view of `image` to be `expected`, closes it, then requires
/// `qemu-img check` of `path` to be clean and QEMU's view to be the same bytes.
pub fn assert_engine_then_qemu_view(
    mut image: vmsnap_qcow2::Qcow2Image,
    path: &Path,
    size: u64,
    expected: &[u8],
    what: &str,
) {
    assert_engine_view(&mut image, size, expected, &format!("{what}: engine view"));
    drop(image);
    oracle::assert_qemu_check_clean(path, what);
    assert_qemu_view(path, expected, &format!("{what}: qemu view"));
}

/// Requires QEMU's view of the active state of the qcow2 image at `path` (through its
/// backing chain) to be `expected`.
pub fn assert_qemu_view(path: &Path, expected: &[u8], what: &str) {
    assert_same_bytes(expected, &oracle::qemu_read_raw(path, None), what);
}

/// Requires QEMU to read exactly what the model holds: the same snapshot names in table
/// order, every snapshot's bytes and the active state's.
pub fn assert_qemu_reads_model(path: &Path, model: &model::DiskModel, context: &str) {
    assert_eq!(
        oracle::qemu_snapshot_names(path),
        model.snapshot_names(),
        "{context}: qemu-img snapshot list"
    );
    for snapshot in &model.snapshots {
        assert_same_bytes(
            &snapshot.data,
            &oracle::qemu_read_raw(path, Some(&snapshot.name)),
            &format!("{context}: qemu-img convert of snapshot {}", snapshot.name),
        );
    }
    assert_qemu_view(
        path,
        &model.active,
        &format!("{context}: qemu-img convert of the active state"),
    );
}

/// The error message contract of a refused image: one line, naming at least one of
/// `names` (the image's file name, or the backing file at fault).
pub fn assert_one_line_error(message: &str, names: &[&str], what: &str) {
    assert!(
        !message.contains('\n'),
        "{what}: error message spans lines: {message:?}"
    );
    assert!(
        names.iter().any(|name| message.contains(name)),
        "{what}: error message names none of {names:?}: {message:?}"
    );
}

/// Reads a whole file, naming it if that fails.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The seed for a randomised test: `VMSNAP_TEST_SEED` when set (to replay a failure),
/// otherwise the given default so runs are reproducible.
pub fn seed(default: u64) -> u64 {
    match std::env::var("VMSNAP_TEST_SEED") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("VMSNAP_TEST_SEED={text:?} is not a u64")),
        Err(_) => default,
    }
}

/// Requires a file to be byte-identical to an earlier copy; on failure says how it
/// changed (length, number of changed bytes, first and last changed offset).
pub fn assert_unchanged(before: &[u8], path: &Path, what: &str) {
    let after = read_file(path);
    if before == after.as_slice() {
        return;
    }
    let common = before.len().min(after.len());
    let changed: Vec<usize> = (0..common).filter(|&i| before[i] != after[i]).collect();
    panic!(
        "{what}: {} changed: length {} -> {}, {} bytes differ (first at {:#x?}, last at {:#x?})",
        path.display(),
        before.len(),
        after.len(),
        changed.len(),
        changed.first(),
        changed.last()
    );
}

/// Our `check` (no repair) must see what `qemu-img check` sees: the same counters
/// (errors, corruptions, leaks, image end, total/allocated/fragmented/compressed
/// clusters), and it must not write.
pub fn assert_check_agrees_with_qemu(path: &Path, context: &str) {
    let qemu = oracle::qemu_check(path);
    let before = read_file(path);
    let report = engine::open_ro(path)
        .check(None)
        .unwrap_or_else(|e| panic!("{context}: our check of {}: {e}", path.display()));
    assert_unchanged(&before, path, &format!("{context}: check without repair"));
    let ours = [
        ("check-errors", report.check_errors),
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("image-end-offset", report.image_end_offset),
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
    ];
    let differing: Vec<String> = ours
        .iter()
        .filter(|(field, value)| qemu.count(field) != *value)
        .map(|(field, value)| format!("{field}: ours {value}, qemu-img {}", qemu.count(field)))
        .collect();
    assert!(
        differing.is_empty(),
        "{context}: check of {} differs from qemu-img's: {}",
        path.display(),
        differing.join("; ")
    );
}
