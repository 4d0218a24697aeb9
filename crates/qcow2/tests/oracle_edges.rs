//! Edge cases the random model rarely reaches: refcount-table growth, snapshot tables
//! spanning many clusters, unusual snapshot names, and QEMU-compatible image locking.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use vmsnap_qcow2::{BackingPolicy, Compat};

use common::engine::{self, Layout};
use common::model::DiskModel;
use common::oracle;
use common::raw::Header;
use common::{assert_same_bytes, Scratch};

const MIB: u64 = 1024 * 1024;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers only 32 KiB of
/// file and the first refcount table 2 MiB, so filling an 8 MiB disk twice (with a
/// snapshot in between) makes the engine grow the refcount table several times.
#[test]
fn refcount_table_grows_under_512_byte_clusters_and_64_bit_refcounts() {
    let scratch = Scratch::new();
    let path = scratch.path("grow.qcow2");
    let layout = Layout {
        size: 8 * MIB,
        cluster_size: 512,
        compat: Compat::V3,
        refcount_bits: 64,
    };
    engine::create_qcow2(&path, &layout);
    let first_table_clusters = Header::read(&path).refcount_table_clusters;
    let mut model = DiskModel::zeroed(layout.size);
    let mut image = engine::open_rw(&path);
    for (round, name) in [(1u64, "full-once"), (2, "full-twice")] {
        for chunk in 0..8u64 {
            let data = pattern(round * 100 + chunk, MIB as usize);
            image.write_at(chunk * MIB, &data).expect("fill the disk");
            model.write(chunk * MIB, &data);
        }
        image.create_snapshot(name).expect("snapshot");
        model.create_snapshot(name);
    }
    image
        .delete_snapshot("full-once")
        .expect("delete the first");
    model.delete_snapshot("full-once");
    drop(image);
    let header = Header::read(&path);
    assert!(
        header.refcount_table_clusters > first_table_clusters,
        "the refcount table grew ({first_table_clusters} -> {} clusters)",
        header.refcount_table_clusters
    );
    oracle::assert_qemu_check_clean(&path, "after refcount table growth");
    common::assert_qemu_view(&path, &model.active, "active");
    assert_same_bytes(
        &model.snapshot("full-twice").data,
        &oracle::qemu_read_raw(&path, Some("full-twice")),
        "snapshot full-twice",
    );
}

/// Forty snapshots on 512-byte clusters: the snapshot table spans several clusters and
/// every L2 table's refcount climbs to 41. Delete every other one by id, apply a few,
/// and QEMU must agree on all that remain.
#[test]
fn snapshot_table_spanning_many_clusters() {
    let scratch = Scratch::new();
    let path = scratch.path("many.qcow2");
    let layout = Layout {
        size: 2 * MIB,
        cluster_size: 512,
        compat: Compat::V3,
        refcount_bits: 16,
    };
    engine::create_qcow2(&path, &layout);
    let mut model = DiskModel::zeroed(layout.size);
    let mut image = engine::open_rw(&path);
    for i in 0..40u64 {
        let data = pattern(i, 3000);
        let offset = (i * 48_611) % (layout.size - 3000);
        image.write_at(offset, &data).unwrap();
        model.write(offset, &data);
        let name = format!("many-{i:02}");
        image.create_snapshot(&name).unwrap();
        model.create_snapshot(&name);
    }
    let table_clusters = {
        drop(image);
        let header = Header::read(&path);
        let end = common::raw::snapshot_entry_offset(&path, header.nb_snapshots);
        (end - header.snapshots_offset).div_ceil(512)
    };
    assert!(
        table_clusters > 3,
        "the table spans {table_clusters} clusters"
    );
    let mut image = engine::open_rw(&path);
    for snapshot in model.snapshots.clone().iter().step_by(2) {
        image.delete_snapshot(&snapshot.id).expect("delete by id");
        model.delete_snapshot(&snapshot.name);
    }
    for name in ["many-07", "many-21", "many-39"] {
        image.apply_snapshot(name).expect("apply");
        model.apply_snapshot(name);
    }
    image.write_at(1000, &[0xee; 5000]).unwrap();
    model.write(1000, &[0xee; 5000]);
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after many snapshots");
    common::assert_qemu_reads_model(&path, &model, "after many snapshots");
}

/// Names QEMU accepts: non-ASCII, long, with spaces. They must round-trip exactly.
#[test]
fn unusual_snapshot_names_round_trip() {
    let scratch = Scratch::new();
    let path = scratch.path("names.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=4096");
    // QEMU lists names through a 256-byte buffer, so the oracle sees at most 255 bytes.
    let long = "x".repeat(255);
    let names = ["snäpshot ✓", "with space", long.as_str(), "-leading-dash"];
    let mut image = engine::open_rw(&path);
    for name in names {
        image.create_snapshot(name).expect("create");
    }
    drop(image);
    oracle::assert_qemu_check_clean(&path, "names");
    assert_eq!(oracle::qemu_snapshot_names(&path), names);
    let mut image = engine::open_rw(&path);
    image
        .delete_snapshot("snäpshot ✓")
        .expect("delete by a non-ASCII name");
    image.apply_snapshot(&long).expect("apply by a long name");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "names after delete");
}

/// While QEMU (qemu-io) has an image open for writing, our writable open must fail with
/// a clear error, and while we have it open for writing, qemu-img must be refused: the
/// engine takes QEMU's locks.
#[test]
fn engine_and_qemu_lock_each_other_out() {
    let scratch = Scratch::new();
    let path = scratch.path("locked.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=65536");
    let mut qemu_io = Command::new("qemu-io")
        .args(["-f", "qcow2", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io is needed as the oracle: run scripts/setup.sh");
    // Wait until qemu-io holds the image: its prompt answers a command.
    let stdin = qemu_io.stdin.as_mut().unwrap();
    writeln!(stdin, "read 0 512").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let refused = engine::try_open(&path, true, BackingPolicy::Ignore);
    let _ = writeln!(qemu_io.stdin.as_mut().unwrap(), "quit");
    let _ = qemu_io.wait();
    match refused {
        Ok(_) => panic!("opened for writing while qemu-io held the image"),
        Err(e) => common::assert_one_line_error(&e.to_string(), &["locked.qcow2"], "locked image"),
    }

    let image = engine::open_rw(&path);
    let output = oracle::qemu_img(&["snapshot", "-c", "while-open", path.to_str().unwrap()]);
    drop(image);
    assert!(
        !output.status.success(),
        "qemu-img wrote to an image our engine had open for writing"
    );
    oracle::assert_qemu_check_clean(&path, "after the lock tests");
}

/// QEMU with lazy refcounts killed mid-run leaves the dirty bit set and refcounts that
/// say used clusters are free. Writing without repairing first would hand those clusters
/// out again and overwrite live data: our engine must repair (as QEMU does on open) or
/// refuse the writable open.
#[test]
fn dirty_image_from_a_crashed_qemu_is_repaired_or_refused() {
    let scratch = Scratch::new();
    let path = scratch.path("dirty.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=4096,lazy_refcounts=on");
    let status = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "abort"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("qemu-io is needed as the oracle: run scripts/setup.sh");
    assert!(!status.success(), "qemu-io aborted");
    assert_eq!(oracle::qemu_check(&path).exit_code, 2, "stale refcounts");
    let before = common::read_file(&path);
    match engine::try_open(&path, true, BackingPolicy::Ignore) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("dirty.qcow2"),
                "names the image: {message}"
            );
            common::assert_unchanged(&before, &path, "a refused open of a dirty image");
        }
        Ok(mut image) => {
            image.write_at(MIB, &[0x22; 64 * 1024]).expect("write");
            image.create_snapshot("after-crash").expect("snapshot");
            image
                .write_at(32 * 1024, &[0x33; 4096])
                .expect("write after snapshot");
            drop(image);
            oracle::assert_qemu_check_clean(&path, "dirty image after our writes");
            let mut expected = vec![0u8; 4 * MIB as usize];
            expected[..64 * 1024].fill(0x11);
            expected[MIB as usize..MIB as usize + 64 * 1024].fill(0x22);
            assert_same_bytes(
                &expected,
                &oracle::qemu_read_raw(&path, Some("after-crash")),
                "the data QEMU wrote before the crash survived",
            );
            expected[32 * 1024..36 * 1024].fill(0x33);
            common::assert_qemu_view(&path, &expected, "active");
        }
    }
}

/// Guest I/O outside the disk, or with offsets that overflow, is refused without a panic
/// and without touching the file; read-only images refuse every change.
#[test]
fn out_of_range_io_and_read_only_images_are_refused() {
    let scratch = Scratch::new();
    let path = scratch.path("range.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=65536");
    oracle::qemu_io(&path, &["write -P 0x61 0 64k"]);
    let before = common::read_file(&path);
    let mut image = engine::open_rw(&path);
    let size = 4 * MIB;
    let mut buf = [0u8; 16];
    assert!(
        image.read_at(size - 8, &mut buf).is_err(),
        "read across the end"
    );
    assert!(image.read_at(size, &mut buf).is_err(), "read at the end");
    assert!(
        image.read_at(u64::MAX - 4, &mut buf).is_err(),
        "read overflowing u64"
    );
    assert!(
        image.write_at(size - 8, &buf).is_err(),
        "write across the end"
    );
    assert!(
        image.write_at(u64::MAX - 4, &buf).is_err(),
        "write overflowing u64"
    );
    assert!(
        image.apply_snapshot("none").is_err(),
        "apply of a missing snapshot"
    );
    assert!(
        image.delete_snapshot("none").is_err(),
        "delete of a missing snapshot"
    );
    drop(image);
    common::assert_unchanged(&before, &path, "refused I/O");

    let mut image = engine::open_ro(&path);
    assert!(
        image.write_at(0, &buf).is_err(),
        "write on a read-only image"
    );
    assert!(
        image.create_snapshot("ro").is_err(),
        "snapshot on a read-only image"
    );
    assert!(
        image.check(Some(vmsnap_qcow2::RepairMode::All)).is_err(),
        "repair on read-only"
    );
    let mut data = vec![0u8; 65536];
    image.read_at(0, &mut data).expect("read-only read");
    assert!(data.iter().all(|&b| b == 0x61));
    drop(image);
    common::assert_unchanged(&before, &path, "read-only image");
}

/// Persistent dirty bitmaps track guest writes; an engine that does not update them must
/// not write guest data behind QEMU's back (QEMU would trust a stale bitmap).
#[test]
fn images_with_persistent_bitmaps_refuse_guest_writes() {
    let scratch = Scratch::new();
    let path = scratch.path("bitmap.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=65536");
    oracle::qemu_img_ok(&["bitmap", "--add", path.to_str().unwrap(), "b0"]);
    let before = common::read_file(&path);
    if let Ok(mut image) = engine::try_open(&path, true, BackingPolicy::Ignore) {
        assert!(
            image.write_at(0, &[1; 512]).is_err(),
            "write under a bitmap"
        );
        drop(image);
    }
    common::assert_unchanged(&before, &path, "refused write under a bitmap");
    oracle::assert_qemu_check_clean(&path, "bitmap image");
}
