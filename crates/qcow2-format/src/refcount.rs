//! Refcount block entries of every width from 1 to 64 bits.
//!
//! Widths below 8 bits pack several entries in a byte, least significant bits
//! first (as QEMU stores them); wider entries are big-endian.

use crate::FormatError;

/// Largest refcount an entry of width `1 << order` bits can hold.
#[inline]
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Reads entry `index` of a refcount block; returns 0 past the block's end.
#[inline]
pub fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    let bit = index.saturating_mul(bits);
    let byte = bit / 8;
    let width = bits.div_ceil(8);
    if byte.saturating_add(width) > block.len() {
        return 0;
    }
    match order {
        0..=2 => (u64::from(block[byte]) >> (bit % 8)) & max_refcount(order),
        3 => u64::from(block[byte]),
        4 => u64::from(u16::from_be_bytes([block[byte], block[byte + 1]])),
        5 => u64::from(crate::be32(block, byte)),
        _ => crate::be64(block, byte),
    }
}

/// Writes entry `index` of a refcount block, refusing values the width cannot hold.
#[inline]
pub fn set_refcount(
    block: &mut [u8],
    order: u32,
    index: usize,
    value: u64,
) -> Result<(), FormatError> {
    if value > max_refcount(order) {
        return Err(FormatError::TooLarge {
            what: "refcount",
            detail: format!("{value} exceeds the {}-bit maximum", 1u32 << order),
        });
    }
    let bits = 1usize << order;
    let bit = index.saturating_mul(bits);
    let byte = bit / 8;
    let width = bits.div_ceil(8);
    if byte.saturating_add(width) > block.len() {
        return Err(FormatError::invalid(
            "refcount index",
            format!("{index} is outside the block"),
        ));
    }
    match order {
        0..=2 => {
            let shift = bit % 8;
            let mask = (max_refcount(order) as u8) << shift;
            block[byte] = (block[byte] & !mask) | ((value as u8) << shift);
        }
        3 => block[byte] = value as u8,
        4 => block[byte..byte + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[byte..byte + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[byte..byte + 8].copy_from_slice(&value.to_be_bytes()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let entries = (64 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..entries {
                set_refcount(&mut block, order, i, (i as u64 * 7 + 3) & max).unwrap();
            }
            for i in 0..entries {
                assert_eq!(get_refcount(&block, order, i), (i as u64 * 7 + 3) & max);
            }
            assert!(set_refcount(&mut block, order, entries, 1).is_err());
            assert_eq!(get_refcount(&block, order, entries), 0);
            if order < 6 {
                assert!(set_refcount(&mut block, order, 0, max + 1).is_err());
            }
        }
    }

    #[test]
    fn layout_matches_qemu() {
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 0, 1, 1).unwrap();
        assert_eq!(b[0], 0b10);
        set_refcount(&mut b, 2, 1, 0xa).unwrap();
        assert_eq!(b[0], 0xa2);
        set_refcount(&mut b, 4, 1, 0x0102).unwrap();
        assert_eq!(&b[2..4], &[1, 2]);
    }
}
