//! L1 and L2 table entries, including compressed-cluster descriptors.

use crate::FormatError;

/// Bits 9..55 of an L1/L2/refcount-table entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Set when the referenced cluster has refcount exactly 1 and may be written in place.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Set on L2 entries that describe compressed data.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Set on (v3) L2 entries whose cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry {
    /// Host offset of the L2 table, or 0 when no L2 table is allocated.
    pub l2_offset: u64,
    /// Whether the L2 table's refcount is 1.
    pub copied: bool,
}

/// Decodes an L1 entry, refusing unaligned L2 offsets.
///
/// Reserved bits are ignored (QEMU masks them too) so images with stray bits
/// stay readable; `check` reports nothing for them either.
#[inline]
pub fn decode_l1_entry(raw: u64, cluster_bits: u32) -> Result<L1Entry, FormatError> {
    let l2_offset = raw & OFFSET_MASK;
    if l2_offset & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(FormatError::invalid(
            "L1 entry",
            format!("L2 table offset {l2_offset:#x} is not cluster aligned"),
        ));
    }
    Ok(L1Entry {
        l2_offset,
        copied: raw & OFLAG_COPIED != 0,
    })
}

/// What one L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster kept for later writes.
    Zero {
        /// Preallocated host cluster (counts in refcounts), or None.
        host: Option<u64>,
        /// The COPIED flag.
        copied: bool,
    },
    /// Data stored uncompressed at a host cluster.
    Normal {
        /// Host offset of the cluster (cluster aligned).
        host: u64,
        /// The COPIED flag.
        copied: bool,
    },
    /// Data stored compressed.
    Compressed {
        /// Host byte offset where the compressed stream starts.
        host: u64,
        /// Bytes from `host` that may belong to the stream (the descriptor's sectors).
        len: u64,
    },
}

impl L2Entry {
    /// The host clusters this entry holds a reference on, as (first byte, byte length).
    pub fn host_range(&self) -> Option<(u64, u64)> {
        match *self {
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => None,
            L2Entry::Zero { host: Some(h), .. } | L2Entry::Normal { host: h, .. } => Some((h, 0)),
            L2Entry::Compressed { host, len } => Some((host, len)),
        }
    }
}

/// Splits a compressed descriptor into (host byte offset, number of 512-byte sectors).
///
/// The split point depends on the cluster size (spec: x = 62 - (cluster_bits - 8)).
#[inline]
pub fn compressed_descriptor(raw: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = raw & ((1u64 << shift) - 1);
    let sectors = ((raw >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors)
}

/// Builds a compressed L2 entry for `len` bytes of stream at `host`.
pub fn encode_compressed(host: u64, len: u64, cluster_bits: u32) -> Result<u64, FormatError> {
    let shift = 62 - (cluster_bits - 8);
    if len == 0 || host >= (1u64 << shift) {
        return Err(FormatError::invalid(
            "compressed descriptor",
            format!("offset {host:#x} or length {len} out of range"),
        ));
    }
    let first_sector = host >> 9;
    let last_sector = (host + len - 1) >> 9;
    let extra = last_sector - first_sector;
    if extra >= (1u64 << (cluster_bits - 8)) {
        return Err(FormatError::invalid(
            "compressed descriptor",
            format!("{len} bytes do not fit the sector count field"),
        ));
    }
    Ok(OFLAG_COMPRESSED | (extra << shift) | host)
}

/// Decodes an L2 entry (standard 64-bit layout).
///
/// Refuses what QEMU refuses when reading: unaligned data offsets and zero
/// flags in version 2 images.
#[inline]
pub fn decode_l2_entry(raw: u64, cluster_bits: u32, version: u32) -> Result<L2Entry, FormatError> {
    if raw & OFLAG_COMPRESSED != 0 {
        let (offset, sectors) = compressed_descriptor(raw & !OFLAG_COPIED, cluster_bits);
        let len = sectors * 512 - (offset & 511);
        return Ok(L2Entry::Compressed { host: offset, len });
    }
    let copied = raw & OFLAG_COPIED != 0;
    let host = raw & OFFSET_MASK;
    if host & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(FormatError::invalid(
            "L2 entry",
            format!("data cluster offset {host:#x} is not cluster aligned"),
        ));
    }
    if raw & OFLAG_ZERO != 0 {
        if version < 3 {
            return Err(FormatError::invalid(
                "L2 entry",
                "zero cluster flag in a version 2 image",
            ));
        }
        return Ok(L2Entry::Zero {
            host: (host != 0).then_some(host),
            copied,
        });
    }
    if host == 0 {
        return Ok(L2Entry::Unallocated);
    }
    Ok(L2Entry::Normal { host, copied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_zero_unallocated() {
        assert_eq!(decode_l2_entry(0, 16, 3).unwrap(), L2Entry::Unallocated);
        assert_eq!(
            decode_l2_entry(OFLAG_COPIED | 0x50000, 16, 3).unwrap(),
            L2Entry::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            decode_l2_entry(1, 16, 3).unwrap(),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            decode_l2_entry(0x30001 | OFLAG_COPIED, 16, 3).unwrap(),
            L2Entry::Zero {
                host: Some(0x30000),
                copied: true
            }
        );
        assert!(decode_l2_entry(1, 16, 2).is_err());
        assert!(decode_l2_entry(0x30200, 16, 3).is_err());
        assert!(decode_l2_entry(0x30200, 9, 3).is_ok());
        assert!(decode_l1_entry(0x10000 | OFLAG_COPIED, 16).unwrap().copied);
        assert!(decode_l1_entry(0x10200, 16).is_err());
    }

    #[test]
    fn compressed_descriptors_every_cluster_size() {
        for bits in 9..=21u32 {
            let cluster = 1u64 << bits;
            for &(host, len) in &[
                (0x1234_5678u64, 100u64),
                (0x1000, cluster),
                (0x1ff, 1),
                (7 << 20, cluster / 2 + 3),
            ] {
                let raw = encode_compressed(host, len, bits).unwrap();
                match decode_l2_entry(raw, bits, 3).unwrap() {
                    L2Entry::Compressed { host: h, len: l } => {
                        assert_eq!(h, host);
                        // The descriptor covers whole sectors: at least len bytes.
                        assert!(l >= len, "bits {bits} len {len} got {l}");
                        assert!(l < len + 512);
                        assert_eq!((h + l) % 512, 0);
                    }
                    other => panic!("bits {bits}: {other:?}"),
                }
            }
        }
        // 64 KiB clusters: offset field is 62 - 8 = 54 bits wide.
        let (off, sectors) = compressed_descriptor((3u64 << 54) | 0x200, 16);
        assert_eq!((off, sectors), (0x200, 4));
        assert!(encode_compressed(0, (2 << 16) + 512, 16).is_err());
    }
}
