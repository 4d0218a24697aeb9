//! Edge cases the random model rarely reaches: refcount-table growth, snapshot tables
//! spanning many clusters, unusual snapshot names, and QEMU-compatible image locking.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use vmsnap_qcow2::{BackingPolicy, Compat, OpenOptions, Qcow2Image};

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
    assert_same_bytes(&model.active, &oracle::qemu_read_raw(&path, None), "active");
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
    let listed: Vec<String> = oracle::qemu_snapshots(&path)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let expected: Vec<String> = model.snapshots.iter().map(|s| s.name.clone()).collect();
    assert_eq!(listed, expected);
    for snapshot in &model.snapshots {
        assert_same_bytes(
            &snapshot.data,
            &oracle::qemu_read_raw(&path, Some(&snapshot.name)),
            &snapshot.name,
        );
    }
    assert_same_bytes(&model.active, &oracle::qemu_read_raw(&path, None), "active");
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
    let listed: Vec<String> = oracle::qemu_snapshots(&path)
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(listed, names);
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
    let refused = Qcow2Image::open(
        &path,
        OpenOptions {
            writable: true,
            backing: BackingPolicy::Ignore,
        },
    );
    let _ = writeln!(qemu_io.stdin.as_mut().unwrap(), "quit");
    let _ = qemu_io.wait();
    match refused {
        Ok(_) => panic!("opened for writing while qemu-io held the image"),
        Err(e) => {
            let message = e.to_string();
            assert!(!message.contains('\n'), "one line: {message:?}");
            assert!(
                message.contains("locked.qcow2"),
                "names the image: {message}"
            );
        }
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
