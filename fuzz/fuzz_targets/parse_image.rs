//! Fuzzes the I/O-free qcow2 parser: the input is the start of an image file. Every
//! decoder must return an error rather than panic or allocate by an untrusted size, and
//! what decodes must encode and decode back to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmsnap_qcow2_format::{
    decode_l1_entry, decode_l2_entry, decode_snapshot_table, decode_u64_table,
    encode_snapshot_table, get_refcount, Header,
};

/// The bytes of `data` at `offset..offset+len`, when the input holds them.
fn slice(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    data.get(start..start.checked_add(len)?)
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    let cluster_bits = header.cluster_bits;
    let cluster_size = header.cluster_size();

    // Header and extensions survive a re-encode.
    let backing_name = header
        .backing_name_range()
        .and_then(|(offset, len)| slice(data, offset, u64::from(len)))
        .and_then(|bytes| std::str::from_utf8(bytes).ok());
    let mut reencoded = header.clone();
    if let Ok(bytes) = reencoded.encode(backing_name) {
        let again = Header::decode(&bytes).expect("a header we encoded decodes");
        assert_eq!(again, reencoded, "header changed through encode/decode");
    }

    // Snapshot table: decode what the input holds, then round-trip it; each snapshot's L1
    // table and its L2 tables are walked like the active ones below.
    let mut l1_tables = vec![(header.l1_table_offset, header.l1_size)];
    if let Some(table) = usize::try_from(header.snapshots_offset)
        .ok()
        .and_then(|start| data.get(start..))
    {
        if let Ok((entries, _len)) = decode_snapshot_table(table, header.nb_snapshots) {
            l1_tables.extend(entries.iter().map(|e| (e.l1_table_offset, e.l1_size)));
            if let Ok(bytes) = encode_snapshot_table(&entries) {
                let count = u32::try_from(entries.len()).expect("count came from a u32");
                let (again, _) =
                    decode_snapshot_table(&bytes, count).expect("an encoded table decodes");
                assert_eq!(
                    again, entries,
                    "snapshot table changed through encode/decode"
                );
            }
        }
    }

    // Active and snapshot L1 tables and the L2 tables they point to, as far as the input
    // holds them. The host range of a decoded entry must not wrap around.
    for (l1_offset, l1_size) in l1_tables {
        let l1_bytes = u64::from(l1_size).saturating_mul(8);
        let Some(l1) = slice(data, l1_offset, l1_bytes) else {
            continue;
        };
        for raw in decode_u64_table(l1) {
            let Ok(entry) = decode_l1_entry(raw, cluster_bits) else {
                continue;
            };
            let _ = entry.copied;
            let l2_offset = raw & vmsnap_qcow2_format::OFFSET_MASK;
            if let Some(l2) = slice(data, l2_offset, cluster_size) {
                for raw in decode_u64_table(l2) {
                    if let Ok(entry) = decode_l2_entry(raw, cluster_bits, header.version) {
                        if let Some((host, len)) = entry.host_range() {
                            assert!(host.checked_add(len).is_some(), "host range wraps");
                        }
                    }
                }
            }
        }
    }

    // First refcount block.
    if let Some(table) = slice(data, header.refcount_table_offset, 8) {
        let block_offset = decode_u64_table(table)[0] & !(cluster_size - 1);
        if let Some(block) = slice(data, block_offset, cluster_size) {
            let entries = (cluster_size * 8) >> header.refcount_order.min(6);
            for index in 0..entries.min(4096) as usize {
                let _ = get_refcount(block, header.refcount_order, index);
            }
        }
    }
});
