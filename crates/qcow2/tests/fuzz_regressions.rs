//! Inputs the fuzzers (fuzz/) found, kept as regression tests of the format crate and
//! the engine. Each test names the target and what went wrong; the raw inputs are in
//! tests/fuzz-cases/.

use vmsnap_qcow2_format::{decode_snapshot_table, encode_snapshot_table, Header};

/// The parse_image target's header property: a header that decodes must encode to
/// bytes that decode to the same header (or the input must be refused outright).
fn header_round_trips_or_is_refused(data: &[u8]) {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    let backing_name = header
        .backing_name_range()
        .and_then(|(offset, len)| data.get(offset as usize..offset as usize + len as usize))
        .and_then(|bytes| std::str::from_utf8(bytes).ok());
    let mut reencoded = header.clone();
    let Ok(bytes) = reencoded.encode(backing_name) else {
        return;
    };
    match Header::decode(&bytes) {
        Ok(again) => assert_eq!(again, reencoded, "header changed through encode/decode"),
        Err(e) => panic!("a header we encoded does not decode: {e}"),
    }
}

/// parse_image, 2026-11-22 (19 of 25 crashes): a v3 header_length that is not a multiple
/// of 8 (here 110) is accepted; decode aligns extension offsets absolutely, encode pads
/// relative to header_length, so the re-encoded header decodes with phantom extensions.
/// The qcow2 spec requires v3 header_length to be a multiple of 8.
#[test]
fn header_with_unaligned_length_round_trips_or_is_refused() {
    header_round_trips_or_is_refused(include_bytes!(
        "fuzz-cases/parse_image-header-length-110-phantom-extension.bin"
    ));
}

/// parse_image, 2026-11-22 (6 of 25 crashes): same root cause (header_length 105); the
/// re-encoded header is refused by decode ("extension … past the header area").
#[test]
fn header_with_unaligned_length_reencodes_to_a_decodable_header() {
    header_round_trips_or_is_refused(include_bytes!(
        "fuzz-cases/parse_image-header-length-unaligned-reencode-refused.bin"
    ));
}

/// Hand-made: every unaligned v3 header_length between 105 and 119 on a QEMU-like
/// header with the usual feature-table-free layout must round-trip or be refused.
#[test]
fn unaligned_header_lengths_round_trip_or_are_refused() {
    for length in 105u32..120 {
        let mut data = vec![0u8; 1024];
        data[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
        data[4..8].copy_from_slice(&3u32.to_be_bytes());
        data[20..24].copy_from_slice(&10u32.to_be_bytes()); // 1 KiB clusters
        data[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        data[36..40].copy_from_slice(&8u32.to_be_bytes());
        data[40..48].copy_from_slice(&0xc00u64.to_be_bytes());
        data[48..56].copy_from_slice(&0x400u64.to_be_bytes());
        data[56..60].copy_from_slice(&1u32.to_be_bytes());
        data[96..100].copy_from_slice(&4u32.to_be_bytes());
        data[100..104].copy_from_slice(&length.to_be_bytes());
        // Two empty unknown extensions, then the end marker, laid out as QEMU reads
        // them: each 8-byte extension header follows the previous one directly.
        let start = length as usize;
        data[start..start + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        data[start + 8..start + 12].copy_from_slice(&0x2345_6789u32.to_be_bytes());
        header_round_trips_or_is_refused(&data);
    }
}

/// parse_image, 2026-11-22: a v2 snapshot entry with no extra data decodes with
/// `disk_size: None`; encoding it wrote a disk size of 0, so the entry came back as
/// `Some(0)`. An engine rewriting the table that way records a 0-byte disk for the
/// snapshot, and applying it would shrink the disk to nothing (QEMU reads a missing
/// disk size as the image's current size and writes that value back).
#[test]
fn snapshot_entry_without_disk_size_round_trips() {
    // 40 fixed bytes, no extra data, id "1", name "a", padded to 48.
    let mut raw = vec![0u8; 48];
    raw[12..14].copy_from_slice(&1u16.to_be_bytes()); // id_str_size
    raw[14..16].copy_from_slice(&1u16.to_be_bytes()); // name_size
    raw[40] = b'1';
    raw[41] = b'a';
    let (entries, _) = decode_snapshot_table(&raw, 1).expect("a valid v2 entry");
    assert_eq!(
        entries[0].disk_size, None,
        "the entry has no disk size field"
    );
    let encoded = encode_snapshot_table(&entries).expect("encode");
    let (again, _) = decode_snapshot_table(&encoded, 1).expect("decode what we encoded");
    assert_eq!(again, entries, "encode/decode changed the entry");
}

/// The fuzzer's own input for the case above (a whole v2 image prefix).
#[test]
fn snapshot_table_from_fuzz_input_round_trips() {
    let data = include_bytes!("fuzz-cases/parse_image-snapshot-without-disk-size.bin");
    let header = Header::decode(data).expect("the fuzz input's header decodes");
    let table = &data[header.snapshots_offset as usize..];
    let (entries, _) = decode_snapshot_table(table, header.nb_snapshots).expect("table decodes");
    let encoded = encode_snapshot_table(&entries).expect("encode");
    let (again, _) = decode_snapshot_table(&encoded, entries.len() as u32).expect("decode");
    assert_eq!(
        again, entries,
        "snapshot table changed through encode/decode"
    );
}

/// snapshot_ops, 2026-11-22 02:49 UTC (within a minute): a v3 image (512-byte clusters,
/// snapshots "s1" and "second") whose active L2 table maps guest data to cluster 1280,
/// past the end of the file (refcount 0). Applying "s1" switched the active L1 table,
/// then failed when the old active tree's references were dropped ("refcount of cluster
/// 1280 would drop below zero"), so the refused apply had changed the image. Every
/// snapshot operation must now refuse such a tree up front, writing nothing.
#[test]
fn snapshot_operations_on_a_tree_with_refcount_zero_are_refused_unchanged() {
    use vmsnap_qcow2::{BackingPolicy, ErrorKind, OpenOptions, Qcow2Image};
    let input: &[u8] = include_bytes!("fuzz-cases/snapshot_ops-apply-refcount-zero.bin");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("case.qcow2");
    std::fs::write(&path, input).expect("write the case");
    let options = OpenOptions {
        writable: true,
        backing: BackingPolicy::Ignore,
    };
    let mut image = Qcow2Image::open(&path, options).expect("the image opens");
    let first = image.snapshots()[0].id.clone();
    let attempts = [
        ("apply", image.apply_snapshot(&first)),
        ("create", image.create_snapshot("new").map(|_| ())),
    ];
    for (what, result) in attempts {
        let err = result.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(
            err.to_string()
                .contains("0xa0000, past the end of the file"),
            "{what}: {err}"
        );
    }
    drop(image);
    assert!(
        std::fs::read(&path).expect("read back") == input,
        "a refused snapshot operation changed the image"
    );
}

/// snapshot_ops, 2026-11-22 02:54 UTC: an image whose snapshot table clusters have
/// refcount 0. Creating a snapshot wrote the new table and switched the header to it,
/// then failed freeing the old table ("refcount of cluster 18 would drop below zero"):
/// the snapshot existed but the caller was told it failed. Now refused before any write.
#[test]
fn snapshot_create_with_an_unreferenced_snapshot_table_is_refused_unchanged() {
    use vmsnap_qcow2::{BackingPolicy, ErrorKind, OpenOptions, Qcow2Image};
    let input: &[u8] = include_bytes!("fuzz-cases/snapshot_ops-create-table-refcount-zero.bin");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("case.qcow2");
    std::fs::write(&path, input).expect("write the case");
    let options = OpenOptions {
        writable: true,
        backing: BackingPolicy::Ignore,
    };
    let mut image = Qcow2Image::open(&path, options).expect("the image opens");
    image.flush().expect("flush after open");
    let before = std::fs::read(&path).expect("read");
    let err = image
        .create_snapshot("fuzz")
        .expect_err("create must be refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("refcount 0"), "{err}");
    drop(image);
    assert!(
        std::fs::read(&path).expect("read back") == before,
        "a refused snapshot create changed the image"
    );
}
