//! Differential tests of `check` and its repair against `qemu-img check`: an image QEMU
//! wrote is damaged in one specific way; both tools check it (our counters must equal
//! qemu-img's), both repair a copy with `-r all`, and our repaired image must be as
//! clean, and read the same, as the one qemu-img repaired.

mod common;

use std::path::{Path, PathBuf};

use vmsnap_qcow2::{BackingPolicy, RepairMode};

use common::raw::{self, Header, COMPRESSED_FLAG, COPIED_FLAG, L1_OFFSET_MASK};
use common::Scratch;
use common::{engine, oracle};

/// 4 MiB, 4 KiB clusters, v3: plain, compressed and zero clusters, one snapshot
/// ("test") sharing most of them, and two clusters rewritten after it (private again).
fn damaged_copies(poke: impl Fn(&Path, &Header)) -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let ours = scratch.path("ours.qcow2");
    oracle::qemu_create(&ours, 4 << 20, "cluster_size=4096,compat=1.1");
    oracle::qemu_io(
        &ours,
        &[
            "write -P 0x11 0 64k",
            "write -c -P 0x12 1M 4k",
            "write -P 0x13 2M 8k",
        ],
    );
    oracle::qemu_img_ok(&["snapshot", "-c", "test", ours.to_str().unwrap()]);
    oracle::qemu_io(&ours, &["write -P 0x14 8k 8k", "write -z 32k 4k"]);
    oracle::assert_qemu_check_clean(&ours, "undamaged image");
    let header = Header::read(&ours);
    poke(&ours, &header);
    let theirs = scratch.path("theirs.qcow2");
    std::fs::copy(&ours, &theirs).unwrap();
    (scratch, ours, theirs)
}

/// The active L2 table (L1 entry 0) and its entry for guest cluster `index`.
fn active_l2_entry(path: &Path, header: &Header, index: u64) -> u64 {
    header.l2_offset(path, 0) + index * 8
}

/// The snapshot's L2 table (its L1 entry 0).
fn snapshot_l2(path: &Path) -> u64 {
    let entry = raw::snapshot_entry_offset(path, 0);
    let l1 = raw::peek_u64(path, entry);
    raw::peek_u64(path, l1) & L1_OFFSET_MASK
}

/// How closely our counters must follow qemu-img's for a kind of damage.
#[derive(Clone, Copy, PartialEq)]
enum Parity {
    /// Every counter equal (refcount-level damage both tools see the same way).
    Exact,
    /// The same verdict (exit status: clean, check failed, corrupt, leaks only): for
    /// structural garbage qemu-img's counts are artifacts of how far it reads.
    Verdict,
}

fn differential(what: &str, parity: Parity, poke: impl Fn(&Path, &Header)) {
    let (_scratch, ours, theirs) = damaged_copies(poke);
    let found = oracle::qemu_check(&theirs);
    if parity == Parity::Exact {
        common::assert_check_agrees_with_qemu(&ours, what);
    } else {
        let before = common::read_file(&ours);
        let report = engine::try_open(&ours, false, BackingPolicy::Ignore)
            .and_then(|mut image| image.check(None))
            .unwrap_or_else(|e| panic!("{what}: qemu-img can check this image, we cannot: {e}"));
        common::assert_unchanged(&before, &ours, what);
        // 0 clean, 3 leaks only, 1 or 2 damaged (qemu-img says "check failed" where it
        // cannot read refcounts at all; reporting the damage itself is as good).
        let verdict = |code: i32| if code == 1 { 2 } else { code };
        assert_eq!(
            verdict(i32::from(report.exit_code())),
            verdict(found.exit_code),
            "{what}: our verdict {report:?} vs qemu-img's {}",
            found.json
        );
    }

    let _ = oracle::qemu_img(&["check", "-r", "all", theirs.to_str().unwrap()]);
    let after_theirs = oracle::qemu_check(&theirs);
    let mut image = engine::try_open(&ours, true, BackingPolicy::Ignore)
        .unwrap_or_else(|e| panic!("{what}: open for repair (qemu-img can repair it): {e}"));
    let _ = image.check(Some(RepairMode::All));
    drop(image);
    let after_ours = oracle::qemu_check(&ours);
    // At least as good as qemu-img's own repair (ours may fix what qemu-img cannot).
    assert!(
        after_ours.exit_code == 0 || after_ours.exit_code == after_theirs.exit_code,
        "{what}: qemu-img check after our repair ({}) vs after qemu-img's own ({})",
        after_ours.json,
        after_theirs.json
    );
    if after_theirs.exit_code == 0 {
        for snapshot in [None, Some("test")] {
            let expected = oracle::qemu_read_raw(&theirs, snapshot);
            common::assert_same_bytes(
                &expected,
                &oracle::qemu_read_raw(&ours, snapshot),
                &format!("{what}: guest view {snapshot:?} after repair, ours vs qemu-img's"),
            );
        }
    }
}

#[test]
fn two_l2_entries_share_one_private_cluster() {
    differential(
        "two L2 entries point at one cluster",
        Parity::Exact,
        |path, header| {
            let a = active_l2_entry(path, header, 2);
            let b = active_l2_entry(path, header, 3);
            raw::poke_u64(path, b, raw::peek_u64(path, a));
        },
    );
}

#[test]
fn l2_entry_not_cluster_aligned() {
    differential(
        "L2 entry not cluster aligned",
        Parity::Verdict,
        |path, header| {
            let e = active_l2_entry(path, header, 2);
            raw::poke_u64(path, e, raw::peek_u64(path, e) + 0x200);
        },
    );
}

#[test]
fn l2_entry_beyond_end_of_file() {
    differential(
        "L2 entry past end of file",
        Parity::Verdict,
        |path, header| {
            let e = active_l2_entry(path, header, 2);
            raw::poke_u64(path, e, COPIED_FLAG | 0x10_0000_0000);
        },
    );
}

#[test]
fn compressed_entry_beyond_end_of_file() {
    differential(
        "compressed L2 entry past end of file",
        Parity::Verdict,
        |path, header| {
            let e = active_l2_entry(path, header, 256);
            let entry = raw::peek_u64(path, e);
            assert!(entry & COMPRESSED_FLAG != 0, "guest 1 MiB is compressed");
            // Keep the sector count bits, move the offset far past the end.
            let offset_bits = 62 - (header.cluster_bits - 8);
            let sectors = entry & !((1u64 << offset_bits) - 1) & !(3 << 62);
            raw::poke_u64(path, e, COMPRESSED_FLAG | sectors | 0x1_0000_0000);
        },
    );
}

#[test]
fn snapshot_l2_entry_with_copied_flag() {
    differential(
        "COPIED flag in the snapshot's shared L2 table",
        Parity::Exact,
        |path, _| {
            let l2 = snapshot_l2(path);
            raw::poke_u64(path, l2, raw::peek_u64(path, l2) | COPIED_FLAG);
        },
    );
}

#[test]
fn l1_entry_not_cluster_aligned() {
    differential(
        "L1 entry not cluster aligned",
        Parity::Verdict,
        |path, header| {
            let entry = raw::peek_u64(path, header.l1_table_offset);
            raw::poke_u64(path, header.l1_table_offset, entry + 0x200);
        },
    );
}

#[test]
fn refcount_block_not_cluster_aligned() {
    differential(
        "refcount table entry not cluster aligned",
        Parity::Verdict,
        |path, header| {
            let entry = raw::peek_u64(path, header.refcount_table_offset);
            raw::poke_u64(path, header.refcount_table_offset, entry + 0x200);
        },
    );
}

#[test]
fn snapshot_l1_table_not_cluster_aligned() {
    differential(
        "snapshot L1 table offset not aligned",
        Parity::Verdict,
        |path, _| {
            let entry = raw::snapshot_entry_offset(path, 0);
            raw::poke_u64(path, entry, raw::peek_u64(path, entry) + 0x200);
        },
    );
}

/// qemu-img check reports a snapshot L1 size past QEMU's limit but its `-r all` fails
/// on it (overlap check, "Check failed"), so there is no repaired image to compare with.
/// Ours must report it (as a corruption, or as a refusal naming the problem) without
/// writing.
#[test]
fn snapshot_l1_table_too_large_is_reported() {
    let (_scratch, ours, _theirs) = damaged_copies(|path, _| {
        let entry = raw::snapshot_entry_offset(path, 0);
        raw::poke_u32(path, entry + 8, 0x1000_0000);
    });
    let before = common::read_file(&ours);
    let verdict = engine::try_open(&ours, false, BackingPolicy::Ignore)
        .and_then(|mut image| image.check(None));
    match verdict {
        Ok(report) => assert!(report.corruptions > 0, "not reported: {report:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("ours.qcow2") && message.contains("L1"),
                "{message}"
            );
        }
    }
    common::assert_unchanged(&before, &ours, "checking a bad snapshot L1 size");
}

#[test]
fn leaked_and_missing_refcounts_together() {
    differential(
        "one refcount too high, another too low",
        Parity::Exact,
        |path, header| {
            let shared = raw::peek_u64(path, active_l2_entry(path, header, 0)) & L1_OFFSET_MASK;
            header.set_refcount(path, shared, 7);
            let private = raw::peek_u64(path, active_l2_entry(path, header, 2)) & L1_OFFSET_MASK;
            header.set_refcount(path, private, 0);
        },
    );
}
