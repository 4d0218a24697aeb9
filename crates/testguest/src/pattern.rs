//! The host-side twin of the guest's write pattern (guest/README.md), so a test
//! can compare the guest's writes with what it reads from an image on the host.
//!
//! Absolute disk sector `i` (bytes `512*i .. 512*i+511`) written with seed `s`
//! holds 16 lines of 32 bytes; line `k` is the 16 lowercase hex digits of `s`,
//! `i` as 13 zero-padded decimal digits, `k` as 2 decimal digits and `\n`.
//! Every sector names its seed and its own position, so data landing at the
//! wrong offset or from the wrong write is caught by a checksum.

use sha2::{Digest, Sha256};

use crate::Error;

/// Sector size of the protocol: offsets and lengths are multiples of it.
pub const SECTOR: u64 = 512;

/// Largest sector number the 13-digit field can carry.
const MAX_SECTOR: u64 = 9_999_999_999_999;

/// Checks that `offset..offset+len` is a non-empty, sector-aligned range the
/// pattern can describe.
pub(crate) fn check_range(offset: u64, len: u64) -> Result<(), Error> {
    if offset % SECTOR != 0 || len % SECTOR != 0 || len == 0 {
        return Err(Error::InvalidArgument(format!(
            "range {offset}+{len}: offset and length must be non-zero multiples of {SECTOR}"
        )));
    }
    let end = offset.checked_add(len).ok_or_else(|| {
        Error::InvalidArgument(format!("range {offset}+{len} overflows a 64-bit offset"))
    })?;
    if (end - 1) / SECTOR > MAX_SECTOR {
        return Err(Error::InvalidArgument(format!(
            "range {offset}+{len} goes beyond the pattern's largest sector {MAX_SECTOR}"
        )));
    }
    Ok(())
}

/// The bytes the guest writes for `write_pattern(_, offset, len, seed)`:
/// lets a test compare an image read on the host byte for byte.
pub fn pattern_bytes(offset: u64, len: u64, seed: u64) -> Result<Vec<u8>, Error> {
    check_range(offset, len)?;
    let capacity = usize::try_from(len).map_err(|_| {
        Error::InvalidArgument(format!("pattern of {len} bytes does not fit in memory"))
    })?;
    let mut out = Vec::with_capacity(capacity);
    for_each_sector(offset, len, seed, |sector| out.extend_from_slice(sector));
    Ok(out)
}

/// The sha256 (lowercase hex) the guest's `disk_checksum` reports for a range
/// that holds exactly the pattern `seed` written at `offset`; computed without
/// holding the whole range in memory.
pub fn pattern_checksum(offset: u64, len: u64, seed: u64) -> Result<String, Error> {
    check_range(offset, len)?;
    let mut hasher = Sha256::new();
    for_each_sector(offset, len, seed, |sector| hasher.update(sector));
    Ok(hex(&hasher.finalize()))
}

/// sha256 of `bytes` in the guest's format (lowercase hex), for comparing
/// host-side reads of an image with `disk_checksum`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn for_each_sector(offset: u64, len: u64, seed: u64, mut sink: impl FnMut(&[u8])) {
    let mut sector = [0u8; SECTOR as usize];
    let first = offset / SECTOR;
    for index in first..first + len / SECTOR {
        let prefix = format!("{seed:016x}{index:013}");
        for (line, chunk) in sector.chunks_exact_mut(32).enumerate() {
            chunk[..29].copy_from_slice(prefix.as_bytes());
            chunk[29..31].copy_from_slice(format!("{line:02}").as_bytes());
            chunk[31] = b'\n';
        }
        sink(&sector);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_layout_names_seed_sector_and_line() {
        let bytes = pattern_bytes(3 * 512, 1024, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(bytes.len(), 1024);
        assert_eq!(&bytes[..32], b"0123456789abcdef000000000000300\n");
        assert_eq!(&bytes[32..64], b"0123456789abcdef000000000000301\n");
        assert_eq!(&bytes[480..512], b"0123456789abcdef000000000000315\n");
        assert_eq!(&bytes[512..544], b"0123456789abcdef000000000000400\n");
    }

    #[test]
    fn checksum_matches_bytes_and_depends_on_offset_and_seed() {
        let bytes = pattern_bytes(4096, 8192, 7).unwrap();
        let sum = pattern_checksum(4096, 8192, 7).unwrap();
        assert_eq!(sum, sha256_hex(&bytes));
        assert_ne!(sum, pattern_checksum(4096 + 512, 8192, 7).unwrap());
        assert_ne!(sum, pattern_checksum(4096, 8192, 8).unwrap());
    }

    #[test]
    fn known_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rejects_unaligned_empty_and_overflowing_ranges() {
        assert!(pattern_bytes(1, 512, 0).is_err());
        assert!(pattern_bytes(0, 100, 0).is_err());
        assert!(pattern_bytes(0, 0, 0).is_err());
        assert!(pattern_checksum(u64::MAX - 511, 1024, 0).is_err());
    }
}
