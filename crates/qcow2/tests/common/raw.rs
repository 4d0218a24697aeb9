//! Raw access to qcow2 header fields and arbitrary bytes of an image file, written here
//! from the qcow2 specification (independently of the engine) so corruption tests can
//! poke exactly the bytes they mean to.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Byte offsets of header fields (qcow2 spec, "Header").
pub mod field {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
}

/// Reads `len` bytes at `offset`.
pub fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = std::fs::File::open(path).expect("open image for peeking");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len];
    file.read_exact(&mut buf).expect("peek inside the file");
    buf
}

/// A big-endian u64 at `offset`.
pub fn peek_u64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(peek(path, offset, 8).try_into().expect("8 bytes"))
}

/// A big-endian u32 at `offset`.
pub fn peek_u32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(peek(path, offset, 4).try_into().expect("4 bytes"))
}

/// A big-endian u16 at `offset`.
pub fn peek_u16(path: &Path, offset: u64) -> u16 {
    u16::from_be_bytes(peek(path, offset, 2).try_into().expect("2 bytes"))
}

/// Overwrites bytes at `offset` (the file grows if needed, like `poke_file` in iotests).
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for poking");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(bytes).expect("poke");
}

/// Writes a big-endian u64 at `offset`.
pub fn poke_u64(path: &Path, offset: u64, value: u64) {
    poke(path, offset, &value.to_be_bytes());
}

/// Writes a big-endian u32 at `offset`.
pub fn poke_u32(path: &Path, offset: u64, value: u32) {
    poke(path, offset, &value.to_be_bytes());
}

/// Writes a big-endian u16 at `offset`.
pub fn poke_u16(path: &Path, offset: u64, value: u16) {
    poke(path, offset, &value.to_be_bytes());
}

/// The header fields the tests navigate by.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub refcount_order: u32,
    pub header_length: u32,
}

impl Header {
    /// Reads the header of a qcow2 file.
    pub fn read(path: &Path) -> Header {
        let version = peek_u32(path, field::VERSION);
        Header {
            version,
            cluster_bits: peek_u32(path, field::CLUSTER_BITS),
            size: peek_u64(path, field::SIZE),
            l1_size: peek_u32(path, field::L1_SIZE),
            l1_table_offset: peek_u64(path, field::L1_TABLE_OFFSET),
            refcount_table_offset: peek_u64(path, field::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: peek_u32(path, field::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: peek_u32(path, field::NB_SNAPSHOTS),
            snapshots_offset: peek_u64(path, field::SNAPSHOTS_OFFSET),
            refcount_order: if version >= 3 {
                peek_u32(path, field::REFCOUNT_ORDER)
            } else {
                4
            },
            header_length: if version >= 3 {
                peek_u32(path, field::HEADER_LENGTH)
            } else {
                72
            },
        }
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The host offset of the L2 table behind L1 entry `index` (0 when unallocated).
    pub fn l2_offset(&self, path: &Path, index: u64) -> u64 {
        peek_u64(path, self.l1_table_offset + index * 8) & L1_OFFSET_MASK
    }

    /// The host offset of the refcount block covering host cluster 0.
    pub fn first_refblock_offset(&self, path: &Path) -> u64 {
        peek_u64(path, self.refcount_table_offset) & !((1 << 9) - 1)
    }

    /// The raw refcount of `host_offset`'s cluster, read through refcount table entry 0
    /// (enough for the small images tests poke; panics for clusters beyond block 0).
    pub fn refcount(&self, path: &Path, host_offset: u64) -> u64 {
        let (byte, shift, width) = self.refcount_position(path, host_offset);
        let raw = peek(path, byte, width.div_ceil(8) as usize);
        let mut value = 0u64;
        for b in raw {
            value = (value << 8) | u64::from(b);
        }
        (value >> shift) & mask(width)
    }

    /// Sets the raw refcount of `host_offset`'s cluster (refcount block 0 only).
    pub fn set_refcount(&self, path: &Path, host_offset: u64, refcount: u64) {
        let (byte, shift, width) = self.refcount_position(path, host_offset);
        let len = width.div_ceil(8) as usize;
        let raw = peek(path, byte, len);
        let mut value = 0u64;
        for b in &raw {
            value = (value << 8) | u64::from(*b);
        }
        value = (value & !(mask(width) << shift)) | ((refcount & mask(width)) << shift);
        let bytes = value.to_be_bytes();
        poke(path, byte, &bytes[8 - len..]);
    }

    /// Where a cluster's refcount lives: (file byte offset, bit shift inside the big-endian
    /// value read from there, width in bits).
    fn refcount_position(&self, path: &Path, host_offset: u64) -> (u64, u32, u32) {
        let width = 1u32 << self.refcount_order;
        let cluster = host_offset >> self.cluster_bits;
        let per_block = (self.cluster_size() * 8) / u64::from(width);
        assert!(
            cluster < per_block,
            "test helper only pokes refcount block 0 (cluster {cluster} is beyond it)"
        );
        let block = self.first_refblock_offset(path);
        let bit = cluster * u64::from(width);
        if width >= 8 {
            (block + bit / 8, 0, width)
        } else {
            // Sub-byte refcounts are packed least significant bits first within each byte.
            let shift = (bit % 8) as u32;
            (block + bit / 8, shift, width)
        }
    }
}

/// Bits 9..=55 of an L1/L2 entry hold the host offset.
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of L1/L2 entries: refcount is exactly one, writes may go in place.
pub const COPIED_FLAG: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED_FLAG: u64 = 1 << 62;

fn mask(width: u32) -> u64 {
    if width == 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

/// The header's byte offset of snapshot entry `index` (entries are 8-byte aligned:
/// 40 fixed bytes, extra data, id, name, padding).
pub fn snapshot_entry_offset(path: &Path, index: u32) -> u64 {
    let header = Header::read(path);
    let mut offset = header.snapshots_offset;
    for _ in 0..index {
        let id_len = u64::from(peek_u16(path, offset + 12));
        let name_len = u64::from(peek_u16(path, offset + 14));
        let extra_len = u64::from(peek_u32(path, offset + 36));
        offset += (40 + extra_len + id_len + name_len).div_ceil(8) * 8;
    }
    offset
}
