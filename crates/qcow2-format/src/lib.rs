//! qcow2 on-disk structures: decode and encode, with no I/O.
//!
//! Everything here works on byte slices the caller has read, so it can be unit
//! tested and fuzzed on its own. Decoders never panic and never allocate by a
//! size read from the image without first checking it against the slice they
//! were given or the limits QEMU enforces (see `docs/interop/qcow2.txt`).

mod entries;
mod error;
mod header;
mod refcount;
mod snapshot;

pub use entries::{
    compressed_descriptor, decode_l1_entry, decode_l2_entry, encode_compressed, L1Entry, L2Entry,
    OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
pub use error::FormatError;
pub use header::{
    qemu_feature_table, BackingFormat, Header, HeaderExtension, EXT_BACKING_FORMAT, EXT_BITMAPS,
    EXT_DATA_FILE, EXT_ENCRYPTION, EXT_FEATURE_TABLE, MAGIC,
};
pub use refcount::{get_refcount, max_refcount, set_refcount};
pub use snapshot::{decode_snapshot_table, encode_snapshot_table, SnapshotEntry};

/// Smallest cluster size QEMU accepts (512 B), as a shift.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts (2 MiB), as a shift.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU refuses active or snapshot L1 tables larger than this many bytes.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// QEMU refuses refcount tables larger than this many bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// QEMU refuses images with more internal snapshots than this.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU refuses snapshot tables larger than this many bytes.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// QEMU refuses snapshot entries whose extra data is longer than this.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Backing file names longer than this are refused, as QEMU does.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest host offset an L1/L2/refcount-table entry can hold (56 bits).
pub const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// Incompatible feature: the image was not closed cleanly and refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: QEMU found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the header's compression_type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature bit this crate can interpret.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
/// Compatible feature: refcount updates may be deferred (requires the dirty bit on open).
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Compression types from the header's compression_type field.
pub const COMPRESSION_DEFLATE: u8 = 0;
/// Compression type for zstd frames.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Returns the number of refcount entries in one refcount block.
#[inline]
pub fn refcount_block_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// Rounds `value` up to a multiple of `align` (a power of two), saturating.
pub fn align_up(value: u64, align: u64) -> u64 {
    value
        .checked_add(align - 1)
        .map(|v| v & !(align - 1))
        .unwrap_or(!(align - 1))
}

/// Decodes a table of big-endian u64 entries (L1, L2 and refcount tables).
pub fn decode_u64_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encodes a table of u64 entries big-endian, as stored on disk.
pub fn encode_u64_table(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

#[inline]
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline]
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_tables_round_trip() {
        let t = vec![0, 1, u64::MAX, 0x8000_0000_0001_0000];
        assert_eq!(decode_u64_table(&encode_u64_table(&t)), t);
        assert_eq!(encode_u64_table(&[0x0102030405060708])[0], 1);
    }

    #[test]
    fn block_entries_and_alignment() {
        assert_eq!(refcount_block_entries(16, 4), 32768);
        assert_eq!(refcount_block_entries(9, 0), 4096);
        assert_eq!(refcount_block_entries(9, 6), 64);
        assert_eq!(align_up(1, 512), 512);
        assert_eq!(align_up(512, 512), 512);
        assert_eq!(align_up(u64::MAX, 512), !511);
    }
}
