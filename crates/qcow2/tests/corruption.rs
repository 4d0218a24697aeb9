//! Corrupted images, made by poking bytes into images QEMU wrote (the ideas of QEMU's
//! iotests 029, 080 and 261, re-implemented here): our engine must refuse them with a
//! one-line error naming the image, never panic, never allocate by an untrusted size,
//! and never write a byte. Refcount damage must be reported by `check` and repaired by
//! `check -r leaks` / `-r all` so that `qemu-img check` is clean afterwards.

mod common;

use std::path::{Path, PathBuf};

use vmsnap_qcow2::{BackingPolicy, CheckReport, Qcow2Image, RepairMode};

use common::raw::{self, field, Header, COPIED_FLAG};
use common::{assert_same_bytes, Scratch};
use common::{engine, oracle};

const MIB: u64 = 1024 * 1024;

/// A 64 MiB, 64 KiB-cluster v3 image (QEMU's default layout, as iotest 080 uses) with one
/// written sector and, if asked, one internal snapshot taken after it.
fn qemu_image(scratch: &Scratch, name: &str, with_snapshot: bool) -> PathBuf {
    let path = scratch.path(name);
    oracle::qemu_create(&path, 64 * MIB, "cluster_size=65536,compat=1.1");
    oracle::qemu_io(&path, &["write -P 0x2a 0 512"]);
    if with_snapshot {
        oracle::qemu_img_ok(&["snapshot", "-c", "test", path.to_str().unwrap()]);
    }
    path
}

fn try_open(path: &Path, writable: bool) -> Result<Qcow2Image, String> {
    engine::try_open(path, writable, BackingPolicy::Ignore).map_err(|e| e.to_string())
}

/// The error message contract: one line, naming the image file.
fn assert_one_line_naming(message: &str, path: &Path, what: &str) {
    let file_name = path.file_name().unwrap().to_string_lossy();
    common::assert_one_line_error(message, &[&file_name], what);
}

/// Both read-write and read-only opens must be refused, with nothing written.
fn assert_refused(path: &Path, what: &str) {
    let before = common::read_file(path);
    for writable in [true, false] {
        match try_open(path, writable) {
            Ok(_) => panic!("{what}: opening (writable={writable}) succeeded on a corrupt image"),
            Err(message) => assert_one_line_naming(&message, path, what),
        }
    }
    common::assert_unchanged(
        &before,
        path,
        &format!("{what}: a refused open changed the image file"),
    );
}

/// Makes a fresh image, pokes it and requires both opens to be refused.
fn refuse_after(with_snapshot: bool, what: &str, poke: impl FnOnce(&Path, &Header)) {
    let scratch = Scratch::new();
    let path = qemu_image(&scratch, "poked.qcow2", with_snapshot);
    let header = Header::read(&path);
    poke(&path, &header);
    assert_refused(&path, what);
}

/// Cuts (or grows) the file to `len` bytes.
fn set_file_len(path: &Path, len: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(len).unwrap();
}

#[test]
fn truncated_inside_header() {
    refuse_after(false, "file truncated to 50 bytes", |path, _| {
        set_file_len(path, 50);
    });
}

#[test]
fn empty_file() {
    refuse_after(false, "empty file", |path, _| set_file_len(path, 0));
}

#[test]
fn truncated_before_l1_table() {
    refuse_after(
        false,
        "file truncated before its L1 table",
        |path, header| set_file_len(path, header.l1_table_offset),
    );
}

#[test]
fn wrong_magic() {
    refuse_after(false, "wrong magic", |path, _| {
        raw::poke(path, field::MAGIC, b"QFIX");
    });
}

#[test]
fn unsupported_versions() {
    for version in [0u32, 1, 4, 0xffff_ffff] {
        refuse_after(false, &format!("version {version}"), |path, _| {
            raw::poke_u32(path, field::VERSION, version);
        });
    }
}

#[test]
fn huge_header_length() {
    for length in [0xffff_ffffu32, 0x7fff_ffff] {
        refuse_after(false, &format!("header_length {length:#x}"), |path, _| {
            raw::poke_u32(path, field::HEADER_LENGTH, length);
        });
    }
}

#[test]
fn header_length_too_small_for_v3() {
    refuse_after(false, "v3 header_length 72", |path, _| {
        raw::poke_u32(path, field::HEADER_LENGTH, 72);
    });
}

#[test]
fn huge_unknown_header_extension() {
    refuse_after(
        false,
        "header extension of 0x7fffffff bytes",
        |path, header| {
            let ext = u64::from(header.header_length);
            // Make sure nothing else (a backing file name) limits the extension area first.
            raw::poke_u64(path, field::BACKING_FILE_OFFSET, 0);
            raw::poke_u32(path, ext, 0x1234_5678);
            raw::poke_u32(path, ext + 4, 0x7fff_ffff);
        },
    );
}

#[test]
fn cluster_bits_out_of_range() {
    for bits in [0u32, 8, 22, 63, 0xffff_ffff] {
        refuse_after(false, &format!("cluster_bits {bits}"), |path, _| {
            raw::poke_u32(path, field::CLUSTER_BITS, bits);
        });
    }
}

#[test]
fn refcount_order_out_of_range() {
    refuse_after(false, "refcount_order 7", |path, _| {
        raw::poke_u32(path, field::REFCOUNT_ORDER, 7);
    });
}

#[test]
fn encrypted_image_is_refused() {
    refuse_after(false, "crypt_method 1 (AES)", |path, _| {
        raw::poke_u32(path, field::CRYPT_METHOD, 1);
    });
}

#[test]
fn huge_refcount_table_size() {
    for clusters in [0xffff_ffffu32, 0x0002_0001] {
        refuse_after(
            false,
            &format!("refcount_table_clusters {clusters:#x}"),
            |path, _| {
                raw::poke_u32(path, field::REFCOUNT_TABLE_CLUSTERS, clusters);
            },
        );
    }
}

#[test]
fn misaligned_refcount_table() {
    refuse_after(
        false,
        "refcount table offset not cluster aligned",
        |path, _| {
            raw::poke_u64(path, field::REFCOUNT_TABLE_OFFSET, 0x1234_5678_90ab_cdef);
        },
    );
}

#[test]
fn refcount_table_past_end_of_file() {
    refuse_after(false, "refcount table past end of file", |path, _| {
        raw::poke_u64(path, field::REFCOUNT_TABLE_OFFSET, 0xffff_ffff_ffff_0000);
        raw::poke_u32(path, field::REFCOUNT_TABLE_CLUSTERS, 0x7f);
    });
}

#[test]
fn refcount_table_overlapping_header() {
    refuse_after(
        false,
        "refcount table at offset 0 (the header)",
        |path, _| {
            raw::poke_u64(path, field::REFCOUNT_TABLE_OFFSET, 0);
        },
    );
}

#[test]
fn l1_table_overlapping_refcount_table() {
    refuse_after(
        false,
        "L1 table on top of the refcount table",
        |path, header| {
            raw::poke_u64(path, field::L1_TABLE_OFFSET, header.refcount_table_offset);
        },
    );
}

#[test]
fn l1_table_overlapping_header() {
    refuse_after(false, "L1 table at offset 0 (the header)", |path, _| {
        raw::poke_u64(path, field::L1_TABLE_OFFSET, 0);
    });
}

#[test]
fn huge_nb_snapshots() {
    for count in [0xffff_ffffu32, 0x7fff_ffff] {
        refuse_after(false, &format!("nb_snapshots {count:#x}"), |path, _| {
            raw::poke_u32(path, field::NB_SNAPSHOTS, count);
        });
    }
}

#[test]
fn snapshot_table_past_end_of_file() {
    refuse_after(false, "snapshot table past end of file", |path, _| {
        raw::poke_u64(path, field::SNAPSHOTS_OFFSET, 0xffff_ffff_ffff_0000);
        raw::poke_u32(path, field::NB_SNAPSHOTS, 0xffff);
    });
}

#[test]
fn misaligned_snapshot_table() {
    refuse_after(
        true,
        "snapshot table offset not cluster aligned",
        |path, _| {
            raw::poke_u64(path, field::SNAPSHOTS_OFFSET, 0x1234_5678_90ab_cdef);
        },
    );
}

#[test]
fn huge_l1_size() {
    for size in [0xffff_ffffu32, 0x7fff_ffff] {
        refuse_after(false, &format!("l1_size {size:#x}"), |path, _| {
            raw::poke_u32(path, field::L1_SIZE, size);
        });
    }
}

#[test]
fn l1_table_past_end_of_file() {
    refuse_after(false, "L1 table past end of file", |path, _| {
        raw::poke_u64(path, field::L1_TABLE_OFFSET, 0x7fff_ffff_ffff_0000);
        raw::poke_u32(path, field::L1_SIZE, 0xffff);
    });
}

#[test]
fn misaligned_l1_table() {
    refuse_after(false, "L1 table offset not cluster aligned", |path, _| {
        raw::poke_u64(path, field::L1_TABLE_OFFSET, 0x1234_5678_90ab_cdef);
        raw::poke_u32(path, field::L1_SIZE, 1);
    });
}

#[test]
fn l1_too_small_for_disk_size() {
    refuse_after(true, "l1_size 0 on a 64 MiB disk", |path, _| {
        raw::poke_u32(path, field::L1_SIZE, 0);
    });
}

#[test]
fn huge_virtual_size() {
    refuse_after(false, "virtual size 2^62 with a one-entry L1", |path, _| {
        raw::poke_u64(path, field::SIZE, 1 << 62);
    });
}

#[test]
fn huge_backing_file_name() {
    refuse_after(false, "backing file name of 0xffffffff bytes", |path, _| {
        raw::poke_u64(path, field::BACKING_FILE_OFFSET, 0x1000);
        raw::poke_u32(path, field::BACKING_FILE_SIZE, 0xffff_ffff);
    });
}

#[test]
fn backing_file_name_past_end_of_file() {
    refuse_after(false, "backing file name past end of file", |path, _| {
        raw::poke_u64(path, field::BACKING_FILE_OFFSET, 0x7fff_ffff_0000);
        raw::poke_u32(path, field::BACKING_FILE_SIZE, 16);
    });
}

#[test]
fn unknown_incompatible_feature() {
    refuse_after(false, "unknown incompatible feature bit 40", |path, _| {
        raw::poke_u64(path, field::INCOMPATIBLE_FEATURES, 1 << 40);
    });
}

#[test]
fn external_data_file_and_extended_l2_are_refused() {
    // Features this engine does not implement must be refused, not ignored.
    for bit in [2u32, 4] {
        refuse_after(
            false,
            &format!("incompatible feature bit {bit}"),
            |path, _| {
                raw::poke_u64(path, field::INCOMPATIBLE_FEATURES, 1 << bit);
            },
        );
    }
}

#[test]
fn unknown_compression_type() {
    refuse_after(false, "compression type 7", |path, header| {
        assert!(
            header.header_length > 104,
            "QEMU 7.2 writes the compression type field"
        );
        raw::poke_u64(path, field::INCOMPATIBLE_FEATURES, 1 << 3);
        raw::poke(path, 104, &[7]);
    });
}

#[test]
fn huge_snapshot_extra_data() {
    refuse_after(true, "snapshot extra_data_size 0x10000", |path, _| {
        let entry = raw::snapshot_entry_offset(path, 0);
        raw::poke_u32(path, entry + 36, 0x0001_0000);
    });
}

#[test]
fn snapshot_id_and_name_past_table() {
    refuse_after(true, "snapshot id/name lengths 0xffff", |path, _| {
        let entry = raw::snapshot_entry_offset(path, 0);
        raw::poke_u16(path, entry + 12, 0xffff);
        raw::poke_u16(path, entry + 14, 0xffff);
    });
}

#[test]
fn more_snapshots_than_the_table_holds() {
    refuse_after(
        true,
        "nb_snapshots 1000 with a one-entry table at the end",
        |path, header| {
            // Move the real one-entry table to the very end of the file so that the second
            // entry would start past EOF.
            let entry = raw::snapshot_entry_offset(path, 0);
            let end = std::fs::metadata(path).unwrap().len();
            let len = (raw::snapshot_entry_offset(path, 1) - entry).min(end - entry);
            let bytes = raw::peek(path, entry, len as usize);
            let new_offset = end.div_ceil(header.cluster_size()) * header.cluster_size();
            raw::poke(path, new_offset, &bytes);
            raw::poke_u64(path, field::SNAPSHOTS_OFFSET, new_offset);
            raw::poke_u32(path, field::NB_SNAPSHOTS, 1000);
        },
    );
}

/// Opens may be allowed for damage QEMU also opens; then every use of the damaged
/// structure must fail cleanly and leave the file as it was.
fn fails_on_use(
    with_snapshot: bool,
    what: &str,
    poke: impl FnOnce(&Path, &Header),
    use_image: impl FnOnce(&mut Qcow2Image) -> Vec<(&'static str, bool)>,
) {
    let scratch = Scratch::new();
    let path = qemu_image(&scratch, "poked.qcow2", with_snapshot);
    let header = Header::read(&path);
    poke(&path, &header);
    let before = common::read_file(&path);
    match try_open(&path, true) {
        Err(message) => assert_one_line_naming(&message, &path, what),
        Ok(mut image) => {
            let results = use_image(&mut image);
            drop(image);
            for (operation, failed) in results {
                assert!(
                    failed,
                    "{what}: {operation} succeeded on a corrupt structure"
                );
            }
        }
    }
    common::assert_unchanged(&before, &path, what);
}

/// The guest-data uses of a damaged L1/L2 entry at guest offset 0: a read and a write.
fn read_and_write_fail(image: &mut Qcow2Image) -> Vec<(&'static str, bool)> {
    let mut buf = vec![0; 512];
    vec![
        ("read", image.read_at(0, &mut buf).is_err()),
        ("write", image.write_at(0, &[1; 512]).is_err()),
    ]
}

/// The uses of a damaged snapshot entry: applying and deleting snapshot "test".
fn apply_and_delete_fail(image: &mut Qcow2Image) -> Vec<(&'static str, bool)> {
    vec![
        ("apply", image.apply_snapshot("test").is_err()),
        ("delete", image.delete_snapshot("test").is_err()),
    ]
}

#[test]
fn l2_entry_with_huge_compressed_offset() {
    fails_on_use(
        false,
        "L2 entry 0 compressed at a huge offset",
        |path, header| {
            let l2 = header.l2_offset(path, 0);
            raw::poke_u64(path, l2, 0xbfff_ffff_ffff_0000);
        },
        read_and_write_fail,
    );
}

#[test]
fn l2_entry_past_end_of_file() {
    fails_on_use(
        false,
        "L2 entry 0 pointing past end of file",
        |path, header| {
            let l2 = header.l2_offset(path, 0);
            raw::poke_u64(path, l2, 0x8000_00ff_ffff_0000);
        },
        read_and_write_fail,
    );
}

#[test]
fn l2_entry_unaligned() {
    fails_on_use(
        false,
        "L2 entry 0 not cluster aligned",
        |path, header| {
            let l2 = header.l2_offset(path, 0);
            let entry = raw::peek_u64(path, l2);
            raw::poke_u64(path, l2, entry + 0x200);
        },
        read_and_write_fail,
    );
}

#[test]
fn l1_entry_past_end_of_file() {
    fails_on_use(
        false,
        "L1 entry 0 pointing at an L2 table past end of file",
        |path, header| {
            raw::poke_u64(path, header.l1_table_offset, COPIED_FLAG | 0x00ff_ffff_0000);
        },
        read_and_write_fail,
    );
}

#[test]
fn l1_entry_pointing_at_the_refcount_table() {
    fails_on_use(
        false,
        "L1 entry 0 pointing at the refcount table (overlapping metadata)",
        |path, header| {
            raw::poke_u64(
                path,
                header.l1_table_offset,
                COPIED_FLAG | header.refcount_table_offset,
            );
        },
        |image| vec![("write", image.write_at(0, &[1; 512]).is_err())],
    );
}

#[test]
fn snapshot_l1_table_offset_invalid() {
    fails_on_use(
        true,
        "snapshot L1 table offset unaligned",
        |path, _| {
            let entry = raw::snapshot_entry_offset(path, 0);
            raw::poke_u64(path, entry, 0x0040_0200);
        },
        apply_and_delete_fail,
    );
}

#[test]
fn snapshot_l1_table_size_huge() {
    fails_on_use(
        true,
        "snapshot L1 size 0x10000000",
        |path, _| {
            let entry = raw::snapshot_entry_offset(path, 0);
            raw::poke_u32(path, entry + 8, 0x1000_0000);
        },
        apply_and_delete_fail,
    );
}

#[test]
fn snapshot_l1_table_past_end_of_file() {
    fails_on_use(
        true,
        "snapshot L1 table past end of file",
        |path, _| {
            let entry = raw::snapshot_entry_offset(path, 0);
            raw::poke_u64(path, entry, 0x00ff_ffff_0000);
        },
        apply_and_delete_fail,
    );
}

/// An image QEMU marked corrupt must not be opened for writing; a read-only open is
/// allowed and then reads the data as it is.
#[test]
fn corrupt_bit_refuses_writable_open() {
    let scratch = Scratch::new();
    let path = qemu_image(&scratch, "marked.qcow2", false);
    let features = raw::peek_u64(&path, field::INCOMPATIBLE_FEATURES);
    raw::poke_u64(&path, field::INCOMPATIBLE_FEATURES, features | 1 << 1);
    let before = common::read_file(&path);
    match try_open(&path, true) {
        Ok(_) => panic!("an image marked corrupt was opened writable"),
        Err(message) => assert_one_line_naming(&message, &path, "corrupt bit"),
    }
    if let Ok(mut image) = try_open(&path, false) {
        let mut buf = vec![0; 1024];
        image
            .read_at(0, &mut buf)
            .expect("read-only read of a marked image");
        assert_eq!(&buf[..512], &[0x2a; 512][..]);
        assert_eq!(&buf[512..], &[0; 512][..]);
    }
    common::assert_unchanged(&before, &path, "the marked image changed");
}

// --- refcount damage: reported by check, repaired by check -r ---

/// A small image with data, one snapshot (so clusters are shared) and more data after it.
fn image_with_shared_clusters(scratch: &Scratch) -> PathBuf {
    let path = scratch.path("shared.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=4096,compat=1.1");
    oracle::qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x22 1M 8k"]);
    oracle::qemu_img_ok(&["snapshot", "-c", "base", path.to_str().unwrap()]);
    oracle::qemu_io(&path, &["write -P 0x33 8k 4k"]);
    oracle::assert_qemu_check_clean(&path, "fresh image with a snapshot");
    path
}

/// Everything a repair must keep: the active bytes and every snapshot's bytes.
fn guest_view(path: &Path) -> Vec<Vec<u8>> {
    let mut views = vec![oracle::qemu_read_raw(path, None)];
    for snapshot in oracle::qemu_snapshots(path) {
        views.push(oracle::qemu_read_raw(path, Some(&snapshot.name)));
    }
    views
}

fn open_rw(path: &Path) -> Qcow2Image {
    try_open(path, true).unwrap_or_else(|e| panic!("open for check: {e}"))
}

/// Requires `qemu-img check` to exit with `code` (2: corruptions, 3: leaks only), so
/// a test knows its poke made the damage it meant to.
fn assert_qemu_check_exit(path: &Path, code: i32, what: &str) {
    assert_eq!(oracle::qemu_check(path).exit_code, code, "{what}");
}

/// Our check without repair: returns its report and requires that it wrote nothing.
fn check_without_repair(path: &Path) -> CheckReport {
    let before = common::read_file(path);
    let report = open_rw(path).check(None).expect("check without repair");
    common::assert_unchanged(&before, path, "check without -r wrote to the image");
    report
}

/// Our check with `mode` repairs; `qemu-img check` must then be clean.
fn repair(path: &Path, mode: RepairMode) {
    let what = match mode {
        RepairMode::Leaks => "check -r leaks",
        RepairMode::All => "check -r all",
    };
    open_rw(path).check(Some(mode)).expect(what);
    oracle::assert_qemu_check_clean(path, &format!("after {what}"));
}

/// After a repair, a write over guest cluster `offset` (4 KiB) must copy a shared
/// cluster rather than change snapshot "base", whose bytes were `snapshot_before`.
fn write_keeps_snapshot(path: &Path, offset: u64, fill: u8, snapshot_before: &[u8], what: &str) {
    let mut image = open_rw(path);
    image
        .write_at(offset, &[fill; 4096])
        .expect("write after repair");
    drop(image);
    oracle::assert_qemu_check_clean(path, "write after repair");
    assert_same_bytes(
        snapshot_before,
        &oracle::qemu_read_raw(path, Some("base")),
        what,
    );
}

/// Host offset of the data cluster behind guest offset `guest` (active L1, L2 table 0).
fn data_cluster(path: &Path, header: &Header, guest: u64) -> u64 {
    let l2 = header.l2_offset(path, 0);
    raw::peek_u64(path, l2 + (guest / header.cluster_size()) * 8) & raw::L1_OFFSET_MASK
}

#[test]
fn raised_refcount_is_a_leak_repaired_by_r_leaks() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    // Guest cluster 0 is shared with the snapshot (refcount 2, no COPIED flag), so a
    // higher refcount is a pure leak (on a COPIED cluster it would also be a corruption).
    let cluster = data_cluster(&path, &header, 0);
    assert_eq!(
        header.refcount(&path, cluster),
        2,
        "guest cluster 0 is shared"
    );
    header.set_refcount(&path, cluster, 5);
    assert_qemu_check_exit(&path, 3, "qemu-img sees a leak");
    let views = guest_view(&path);

    let report = check_without_repair(&path);
    assert!(
        report.leaks > 0,
        "check did not report the leak: {report:?}"
    );
    assert_eq!(
        report.corruptions, 0,
        "a leak is not a corruption: {report:?}"
    );

    repair(&path, RepairMode::Leaks);
    let after = guest_view(&path);
    assert!(views == after, "repairing a leak changed guest data");
}

#[test]
fn refcount_of_unused_cluster_is_a_leak_repaired_by_r_leaks() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    // qemu-img only counts clusters inside the file: grow it by one unreferenced cluster.
    let end = std::fs::metadata(&path).unwrap().len();
    let unused = end.div_ceil(header.cluster_size()) * header.cluster_size();
    set_file_len(&path, unused + header.cluster_size());
    header.set_refcount(&path, unused, 1);
    assert_qemu_check_exit(&path, 3, "qemu-img sees a leak");
    let report = check_without_repair(&path);
    assert!(report.leaks >= 1, "leak not reported: {report:?}");
    repair(&path, RepairMode::Leaks);
}

#[test]
fn lowered_refcount_of_shared_cluster_is_repaired_by_r_all_keeping_snapshot_data() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    // Cluster 0 of the guest is shared by the active L2 table and the snapshot's.
    let shared = data_cluster(&path, &header, 0);
    assert_eq!(
        header.refcount(&path, shared),
        2,
        "guest cluster 0 is shared"
    );
    header.set_refcount(&path, shared, 1);
    assert_qemu_check_exit(&path, 2, "qemu-img sees a corruption");
    let views = guest_view(&path);

    let report = check_without_repair(&path);
    assert!(
        report.corruptions > 0,
        "corruption not reported: {report:?}"
    );

    repair(&path, RepairMode::All);
    assert_eq!(
        header.refcount(&path, shared),
        2,
        "repair restored the shared count"
    );
    assert!(views == guest_view(&path), "repair changed guest data");

    // After the repair a write must copy the shared cluster, not change the snapshot.
    write_keeps_snapshot(
        &path,
        0,
        0x77,
        &views[1],
        "snapshot after a write following repair",
    );
}

#[test]
fn zeroed_refcount_of_used_cluster_is_repaired_by_r_all() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    let cluster = data_cluster(&path, &header, 8192);
    header.set_refcount(&path, cluster, 0);
    assert_qemu_check_exit(&path, 2, "qemu-img sees a corruption");
    let views = guest_view(&path);
    repair(&path, RepairMode::All);
    assert!(views == guest_view(&path), "repair changed guest data");
}

#[test]
fn missing_copied_flag_is_repaired_by_r_all() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    let l2 = header.l2_offset(&path, 0);
    let index = 8192 / header.cluster_size();
    let entry = raw::peek_u64(&path, l2 + index * 8);
    assert!(entry & COPIED_FLAG != 0, "a private cluster carries COPIED");
    raw::poke_u64(&path, l2 + index * 8, entry & !COPIED_FLAG);
    assert_qemu_check_exit(&path, 2, "qemu-img flags OFLAG_COPIED");
    let report = check_without_repair(&path);
    assert!(
        report.corruptions > 0,
        "missing COPIED flag not reported: {report:?}"
    );
    repair(&path, RepairMode::All);
}

#[test]
fn wrong_copied_flag_on_shared_cluster_is_repaired_and_writes_copy() {
    let scratch = Scratch::new();
    let path = image_with_shared_clusters(&scratch);
    let header = Header::read(&path);
    let l2 = header.l2_offset(&path, 0);
    // Guest cluster 1 (4 KiB) is shared with the snapshot: COPIED there is a lie that
    // would let a write go in place and change the snapshot.
    let entry = raw::peek_u64(&path, l2 + 8);
    assert!(
        entry & COPIED_FLAG == 0,
        "a shared cluster has no COPIED flag"
    );
    raw::poke_u64(&path, l2 + 8, entry | COPIED_FLAG);
    assert_qemu_check_exit(&path, 2, "qemu-img flags OFLAG_COPIED");
    let snapshot_before = oracle::qemu_read_raw(&path, Some("base"));
    repair(&path, RepairMode::All);
    write_keeps_snapshot(
        &path,
        4096,
        0x99,
        &snapshot_before,
        "snapshot after repair and write",
    );
}

#[test]
fn leaks_left_by_qemu_refcount_overflow_are_repaired() {
    // qemu-img itself leaks clusters when a snapshot overflows 2-bit refcounts.
    let scratch = Scratch::new();
    let path = scratch.path("overflow.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=4096,refcount_bits=2");
    oracle::qemu_io(&path, &["write -P 0x11 0 8k"]);
    for name in ["s1", "s2", "s3", "s4"] {
        // s3 and s4 fail inside QEMU and leave leaked clusters behind.
        let _ = oracle::qemu_img(&["snapshot", "-c", name, path.to_str().unwrap()]);
    }
    let check = oracle::qemu_check(&path);
    assert_eq!(check.exit_code, 3, "qemu-img left leaks: {}", check.json);
    let views = guest_view(&path);
    let report = check_without_repair(&path);
    assert_eq!(
        report.leaks,
        check.count("leaks"),
        "same leak count as qemu-img: {report:?}"
    );
    repair(&path, RepairMode::Leaks);
    assert!(views == guest_view(&path), "repair changed guest data");
}

/// The image's first `count` snapshot table entries rebuilt with the extra data
/// `extra(index, old_extra)` returns in place of their old one (fixed fields, id and
/// name kept, each entry padded to 8 bytes), as iotest 261 hand-crafts its tables.
fn snapshot_table_with_extra_data(
    path: &Path,
    count: u32,
    extra: impl Fn(u32, &[u8]) -> Vec<u8>,
) -> Vec<u8> {
    let mut table = Vec::new();
    for index in 0..count {
        let entry = raw::snapshot_entry_offset(path, index);
        let old_extra_len = u64::from(raw::peek_u32(path, entry + 36));
        let id_name_len =
            raw::peek_u16(path, entry + 12) as usize + raw::peek_u16(path, entry + 14) as usize;
        let new_extra = extra(index, &raw::peek(path, entry + 40, old_extra_len as usize));
        let mut new = raw::peek(path, entry, 40);
        new[36..40].copy_from_slice(&(new_extra.len() as u32).to_be_bytes());
        new.extend_from_slice(&new_extra);
        new.extend_from_slice(&raw::peek(path, entry + 40 + old_extra_len, id_name_len));
        while new.len() % 8 != 0 {
            new.push(0);
        }
        table.extend_from_slice(&new);
    }
    table
}

/// iotest 261's v2 images: snapshot entries with no extra data, with unknown extra data
/// and with only the VM-state size. We must list them, keep the unknown extra data intact
/// when rewriting the table, and leave qemu-img check clean.
#[test]
fn unusual_snapshot_extra_data_is_kept() {
    let scratch = Scratch::new();
    let path = scratch.path("extra.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=65536,compat=0.10");
    for name in ["sn0", "sn1", "sn2"] {
        oracle::qemu_img_ok(&["snapshot", "-c", name, path.to_str().unwrap()]);
    }
    // Rebuild the table with new extra-data sizes: 0, 42 (16 known + 26 unknown), 8.
    let header = Header::read(&path);
    let table = snapshot_table_with_extra_data(&path, 3, |index, old_extra| {
        let extra_len = [0usize, 42, 8][index as usize];
        let mut extra = vec![0u8; extra_len];
        let known = old_extra.len().min(extra_len).min(16);
        extra[..known].copy_from_slice(&old_extra[..known]);
        if extra_len > 16 {
            extra[16..16 + 19].copy_from_slice(b"very important data");
        }
        extra
    });
    assert!(
        table.len() as u64 <= header.cluster_size(),
        "table fits its cluster"
    );
    raw::poke(&path, header.snapshots_offset, &table);
    oracle::assert_qemu_check_clean(&path, "hand-made v2 snapshot table");

    let mut image = open_rw(&path);
    let names: Vec<String> = image
        .snapshots()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, ["sn0", "sn1", "sn2"]);
    image
        .create_snapshot("sn3")
        .expect("add a snapshot, rewriting the table");
    image
        .delete_snapshot("sn0")
        .expect("delete a snapshot, rewriting the table");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after our table rewrites");
    assert_eq!(oracle::qemu_snapshot_names(&path), ["sn1", "sn2", "sn3"]);
    // sn1's unknown extra data survived.
    let entry = raw::snapshot_entry_offset(&path, 0);
    let extra_len = raw::peek_u32(&path, entry + 36) as u64;
    assert!(
        extra_len >= 42,
        "sn1 keeps its 42 bytes of extra data, has {extra_len}"
    );
    assert_eq!(
        raw::peek(&path, entry + 40 + 16, 19),
        b"very important data"
    );
    // sn2 had no disk size field; QEMU treats a missing one as the image's current size,
    // so a rewritten entry must carry that size (0 would shrink the disk on apply).
    for index in 0..3 {
        let entry = raw::snapshot_entry_offset(&path, index);
        let extra_len = raw::peek_u32(&path, entry + 36) as u64;
        if extra_len >= 16 {
            assert_eq!(
                raw::peek_u64(&path, entry + 40 + 8),
                4 * MIB,
                "disk_size field of snapshot entry {index} after our table rewrite"
            );
        }
    }
    let mut image = open_rw(&path);
    image
        .apply_snapshot("sn2")
        .expect("apply the entry that had no disk size");
    drop(image);
    let info = oracle::qemu_info(&path);
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(4 * MIB),
        "apply kept the disk size"
    );
    oracle::assert_qemu_check_clean(&path, "after applying sn2");
}

/// iotest 261's "botched v3": a v2 image whose version was bumped to 3 keeps snapshot
/// entries without the 16 bytes of extra data v3 requires. qemu-img check counts each as
/// a corruption and `-r all` rewrites the table; ours must report and repair the same.
#[test]
fn v3_snapshot_entries_without_extra_data_are_reported_and_repaired() {
    let scratch = Scratch::new();
    let path = scratch.path("botched.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "compat=0.10");
    oracle::qemu_io(&path, &["write -P 0x44 0 64k"]);
    for name in ["sn0", "sn1"] {
        oracle::qemu_img_ok(&["snapshot", "-c", name, path.to_str().unwrap()]);
    }
    let header = Header::read(&path);
    let table = snapshot_table_with_extra_data(&path, header.nb_snapshots, |_, _| Vec::new());
    raw::poke(&path, header.snapshots_offset, &table);
    raw::poke_u32(&path, field::VERSION, 3);
    raw::poke_u32(&path, field::REFCOUNT_ORDER, 4);
    raw::poke_u32(&path, field::HEADER_LENGTH, 104);
    let qemu = oracle::qemu_check(&path);
    assert_eq!(
        qemu.exit_code, 2,
        "qemu-img counts the short entries: {}",
        qemu.json
    );
    let views = guest_view(&path);

    common::assert_check_agrees_with_qemu(&path, "botched v3 snapshot table");
    repair(&path, RepairMode::All);
    assert_eq!(
        oracle::qemu_snapshot_names(&path),
        ["sn0", "sn1"],
        "the repair kept both snapshots"
    );
    assert!(views == guest_view(&path), "the repair changed guest data");
}
