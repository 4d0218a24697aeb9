//! The internal snapshot table.

use crate::{
    align_up, be16, be32, be64, FormatError, MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOT_TABLE_BYTES,
};

const FIXED_LEN: usize = 40;
/// Extra data QEMU 7.2 writes: vm_state_size_large, disk_size, icount.
const KNOWN_EXTRA_LEN: usize = 24;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's copy of the L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string (QEMU assigns decimal numbers).
    pub id: String,
    /// User-visible name.
    pub name: String,
    /// Wall-clock seconds when taken.
    pub date_sec: u32,
    /// Nanoseconds part of the wall-clock time.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds when taken.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved after the disk data (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size when taken; None when the entry predates the field.
    pub disk_size: Option<u64>,
    /// Instruction count when taken (record/replay); None when absent.
    pub icount: Option<u64>,
    /// Extra data beyond the fields above, kept byte for byte.
    pub unknown_extra: Vec<u8>,
}

impl SnapshotEntry {
    /// Bytes this entry takes when encoded, including padding to 8.
    pub fn encoded_len(&self) -> u64 {
        align_up(
            (FIXED_LEN + self.extra_len() + self.id.len() + self.name.len()) as u64,
            8,
        )
    }

    /// Extra data bytes written: QEMU 7.2's 24, plus unknown data; only the large VM state
    /// size for an entry that never had a disk size (so the absence survives a rewrite).
    fn extra_len(&self) -> usize {
        if self.disk_size.is_none() && self.icount.is_none() && self.unknown_extra.is_empty() {
            8
        } else {
            KNOWN_EXTRA_LEN + self.unknown_extra.len()
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let id_len = u16::try_from(self.id.len()).map_err(|_| FormatError::TooLarge {
            what: "snapshot id",
            detail: format!("{} bytes", self.id.len()),
        })?;
        let name_len = u16::try_from(self.name.len()).map_err(|_| FormatError::TooLarge {
            what: "snapshot name",
            detail: format!("{} bytes", self.name.len()),
        })?;
        let extra_len = self.extra_len();
        if extra_len > 8 && self.disk_size.is_none() {
            // The disk size field would have to be written, and 0 would shrink the disk to
            // nothing on apply: the caller must say what it is (QEMU: the image's size).
            return Err(FormatError::invalid(
                "snapshot disk size",
                format!(
                    "snapshot '{}' has an instruction count or extra data but no disk size",
                    self.name
                ),
            ));
        }
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA as usize {
            return Err(FormatError::TooLarge {
                what: "snapshot extra data",
                detail: format!("{extra_len} bytes"),
            });
        }
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        // Older readers see a VM state that does not fit 32 bits as disk-only, as QEMU writes it.
        let small = u32::try_from(self.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        if extra_len > 8 {
            out.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
            out.extend_from_slice(&self.unknown_extra);
        }
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(align_up(out.len() as u64, 8) as usize, 0);
        Ok(())
    }
}

/// Decodes `count` entries from `buf` (the table read from `snapshots_offset`).
///
/// Returns the entries and the bytes they occupy. A `Truncated` error means
/// `buf` ended early: the caller may retry with more of the file.
pub fn decode_snapshot_table(
    buf: &[u8],
    count: u32,
) -> Result<(Vec<SnapshotEntry>, u64), FormatError> {
    if count > MAX_SNAPSHOTS {
        return Err(FormatError::invalid(
            "nb_snapshots",
            format!("{count}: too many snapshots"),
        ));
    }
    let mut entries = Vec::with_capacity((count as usize).min(buf.len() / FIXED_LEN));
    let mut off = 0usize;
    for index in 0..count {
        off = align_up(off as u64, 8) as usize;
        let need = off + FIXED_LEN;
        if need > buf.len() {
            return Err(FormatError::truncated(
                "snapshot table",
                need as u64,
                buf.len(),
            ));
        }
        let e = &buf[off..];
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12) as usize;
        let name_len = be16(e, 14) as usize;
        let date_sec = be32(e, 16);
        let date_nsec = be32(e, 20);
        let vm_clock_nsec = be64(e, 24);
        let vm_state_small = be32(e, 32);
        let extra_len = be32(e, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::invalid(
                "snapshot extra data size",
                format!("{extra_len} bytes in entry {index} (limit 1024)"),
            ));
        }
        let extra_len = extra_len as usize;
        let total = FIXED_LEN + extra_len + id_len + name_len;
        if off + total > buf.len() {
            return Err(FormatError::truncated(
                "snapshot table",
                (off + total) as u64,
                buf.len(),
            ));
        }
        if l1_table_offset % 512 != 0 || u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(FormatError::invalid(
                "snapshot L1 table",
                format!("entry {index}: offset {l1_table_offset:#x} or size {l1_size} is invalid"),
            ));
        }
        let extra = &e[FIXED_LEN..FIXED_LEN + extra_len];
        let vm_state_size = if extra_len >= 8 {
            be64(extra, 0)
        } else {
            u64::from(vm_state_small)
        };
        let disk_size = (extra_len >= 16).then(|| be64(extra, 8));
        let icount = (extra_len >= 24)
            .then(|| be64(extra, 16))
            .filter(|&v| v != u64::MAX);
        let unknown_extra = extra.get(KNOWN_EXTRA_LEN..).unwrap_or(&[]).to_vec();
        let id_start = FIXED_LEN + extra_len;
        let id = String::from_utf8_lossy(&e[id_start..id_start + id_len]).into_owned();
        let name = String::from_utf8_lossy(&e[id_start + id_len..id_start + id_len + name_len])
            .into_owned();
        entries.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            unknown_extra,
        });
        off += total;
        if off as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(FormatError::invalid(
                "snapshot table",
                format!("larger than {MAX_SNAPSHOT_TABLE_BYTES} bytes"),
            ));
        }
    }
    Ok((entries, off as u64))
}

/// Encodes a snapshot table as QEMU 7.2 writes it (24 bytes of known extra data).
pub fn encode_snapshot_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>, FormatError> {
    if entries.len() > MAX_SNAPSHOTS as usize {
        return Err(FormatError::TooLarge {
            what: "snapshot table",
            detail: format!("{} snapshots (limit {MAX_SNAPSHOTS})", entries.len()),
        });
    }
    let mut out = Vec::new();
    for e in entries {
        e.encode_into(&mut out)?;
    }
    if out.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
        return Err(FormatError::TooLarge {
            what: "snapshot table",
            detail: format!("{} bytes", out.len()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 16,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 42,
            vm_state_size: 5 << 32,
            disk_size: Some(1 << 30),
            icount: None,
            unknown_extra: vec![9, 8, 7],
        }
    }

    #[test]
    fn round_trip_with_unknown_extra() {
        let entries = vec![entry("1", "first"), entry("2", "second snapshot")];
        let bytes = encode_snapshot_table(&entries).unwrap();
        let (decoded, len) = decode_snapshot_table(&bytes, 2).unwrap();
        assert_eq!(decoded, entries);
        assert_eq!(align_up(len, 8), bytes.len() as u64);
        assert_eq!(
            entries.iter().map(SnapshotEntry::encoded_len).sum::<u64>(),
            bytes.len() as u64
        );
        // A VM state above 4 GiB is hidden from 32-bit readers.
        assert_eq!(&bytes[32..36], &[0, 0, 0, 0]);
    }

    #[test]
    fn old_entries_without_extra_data() {
        let mut raw = vec![0u8; 48];
        raw[8..12].copy_from_slice(&4u32.to_be_bytes());
        raw[12..14].copy_from_slice(&1u16.to_be_bytes());
        raw[14..16].copy_from_slice(&2u16.to_be_bytes());
        raw[32..36].copy_from_slice(&77u32.to_be_bytes());
        raw[40..43].copy_from_slice(b"7ab");
        let (d, len) = decode_snapshot_table(&raw, 1).unwrap();
        assert_eq!(len, 43);
        assert_eq!(d[0].vm_state_size, 77);
        assert_eq!(d[0].disk_size, None);
        assert_eq!(d[0].id, "7");
        assert_eq!(d[0].name, "ab");
    }

    #[test]
    fn never_invents_a_disk_size() {
        let mut e = entry("1", "a");
        e.disk_size = None;
        e.unknown_extra.clear();
        let (again, _) =
            decode_snapshot_table(&encode_snapshot_table(&[e.clone()]).unwrap(), 1).unwrap();
        assert_eq!(
            again[0], e,
            "an entry without disk size round-trips without one"
        );
        e.icount = Some(7);
        assert!(matches!(
            encode_snapshot_table(&[e]),
            Err(FormatError::Invalid { .. })
        ));
    }

    #[test]
    fn refuses_bad_tables() {
        let bytes = encode_snapshot_table(&[entry("1", "a")]).unwrap();
        assert!(matches!(
            decode_snapshot_table(&bytes, 2),
            Err(FormatError::Truncated { .. })
        ));
        assert!(decode_snapshot_table(&bytes, MAX_SNAPSHOTS + 1).is_err());
        let mut big = bytes.clone();
        big[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(decode_snapshot_table(&big, 1).is_err());
        let mut l1 = bytes.clone();
        l1[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_snapshot_table(&l1, 1).is_err());
        let (_, used) = decode_snapshot_table(&bytes, 1).unwrap();
        for n in 0..used as usize {
            assert!(decode_snapshot_table(&bytes[..n], 1).is_err());
        }
    }
}
