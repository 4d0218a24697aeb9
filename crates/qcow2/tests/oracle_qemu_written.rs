//! The reverse oracle: images that `qemu-img`/`qemu-io`/QEMU's `savevm` wrote and
//! snapshotted, our engine must list, read, apply and delete correctly, leaving an image
//! `qemu-img check` finds clean and QEMU still loads.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::engine;
use common::model::DiskModel;
use common::oracle::{self, qemu_io};
use common::{assert_same_bytes, Scratch};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Builds an image entirely with QEMU's tools: pattern writes, zero writes, discards and
/// compressed writes, with snapshots taken in between. Returns the model of what QEMU
/// wrote, already confirmed against `qemu-img convert`.
fn qemu_made_image(
    path: &Path,
    size: u64,
    options: &str,
    snapshots: usize,
    seed: u64,
) -> DiskModel {
    let mut rng = StdRng::seed_from_u64(common::seed(seed));
    oracle::qemu_create(path, size, options);
    let cluster: u64 = options
        .split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .map(|v| v.parse().unwrap())
        .unwrap_or(65536);
    let mut model = DiskModel::zeroed(size);
    let mut fresh_clusters: Vec<u64> = (0..size / cluster).collect();
    for round in 0..=snapshots {
        let mut commands = Vec::new();
        for _ in 0..12 {
            match rng.gen_range(0..10) {
                0..=5 => {
                    let len = rng.gen_range(1..=(4 * cluster).min(256 * KIB) / 512) * 512;
                    let offset = rng.gen_range(0..=(size - len) / 512) * 512;
                    let pattern = rng.gen_range(1..=255u8);
                    commands.push(format!("write -P {pattern} {offset} {len}"));
                    model.write(offset, &vec![pattern; len as usize]);
                    touched(&mut fresh_clusters, offset, len, cluster);
                }
                6 => {
                    let len = rng.gen_range(1..=8u64) * 512;
                    let offset = rng.gen_range(0..=(size - len) / 512) * 512;
                    commands.push(format!("write -z {offset} {len}"));
                    model.write(offset, &vec![0; len as usize]);
                    touched(&mut fresh_clusters, offset, len, cluster);
                }
                7 => {
                    let index = rng.gen_range(0..size / cluster);
                    commands.push(format!("discard {} {cluster}", index * cluster));
                    model.write(index * cluster, &vec![0; cluster as usize]);
                    fresh_clusters.retain(|&c| c != index);
                }
                _ => {
                    // Compressed writes only go to clusters never written before.
                    if fresh_clusters.is_empty() {
                        continue;
                    }
                    let pick = rng.gen_range(0..fresh_clusters.len());
                    let index = fresh_clusters.swap_remove(pick);
                    let pattern = rng.gen_range(1..=255u8);
                    commands.push(format!(
                        "write -c -P {pattern} {} {cluster}",
                        index * cluster
                    ));
                    model.write(index * cluster, &vec![pattern; cluster as usize]);
                }
            }
        }
        let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io(path, &refs);
        if round < snapshots {
            let name = format!("qsnap{round}");
            oracle::qemu_img_ok(&["snapshot", "-c", &name, path.to_str().unwrap()]);
            model.create_snapshot(&name);
        }
    }
    // The model itself must agree with QEMU before it can judge our engine.
    common::assert_qemu_reads_model(path, &model, "model vs qemu");
    model
}

/// Compressed writes need clusters never written: forget the ones a write touched.
fn touched(fresh_clusters: &mut Vec<u64>, offset: u64, len: u64, cluster: u64) {
    let first = offset / cluster;
    let last = (offset + len - 1) / cluster;
    fresh_clusters.retain(|&c| c < first || c > last);
}

/// Lists, reads, applies and deletes every snapshot of a QEMU-made image through our
/// engine, checking QEMU's view after each step.
fn engine_handles_qemu_image(size: u64, options: &str, snapshots: usize, seed: u64) {
    let scratch = Scratch::new();
    let path = scratch.path("qemu-made.qcow2");
    let mut model = qemu_made_image(&path, size, options, snapshots, seed);
    let context = format!("[{options} seed {seed}]");

    common::assert_check_agrees_with_qemu(&path, &format!("{context} before any change"));

    // List: every field QEMU shows.
    let qemu_list = oracle::qemu_snapshots(&path);
    let mut image = engine::open_ro(&path);
    let ours = image.snapshots();
    assert_eq!(ours.len(), qemu_list.len(), "{context} snapshot count");
    for (our, theirs) in ours.iter().zip(&qemu_list) {
        assert_eq!(our.id.to_string(), theirs.id, "{context} id");
        assert_eq!(our.name.to_string(), theirs.name, "{context} name");
        assert_eq!(
            our.vm_state_size, theirs.vm_state_size,
            "{context} vm state size"
        );
        assert_eq!(
            u64::from(our.date_sec),
            theirs.date_sec,
            "{context} date_sec"
        );
        assert_eq!(
            u64::from(our.date_nsec),
            theirs.date_nsec,
            "{context} date_nsec"
        );
        assert_eq!(
            our.vm_clock_nsec, theirs.vm_clock_nsec,
            "{context} vm clock"
        );
        assert_eq!(our.disk_size, size, "{context} disk size");
    }
    // Read the active state.
    let active = engine::read_all(&mut image, size);
    assert_same_bytes(
        &model.active,
        &active,
        &format!("{context} engine read of active"),
    );
    drop(image);

    // Apply each snapshot in turn and read it back.
    let mut image = engine::open_rw(&path);
    for snapshot in model.snapshots.clone() {
        image
            .apply_snapshot(&snapshot.name)
            .unwrap_or_else(|e| panic!("{context} apply {}: {e}", snapshot.name));
        model.apply_snapshot(&snapshot.name);
        let got = engine::read_all(&mut image, size);
        assert_same_bytes(
            &snapshot.data,
            &got,
            &format!("{context} engine read after applying {}", snapshot.name),
        );
    }
    drop(image);
    oracle::assert_qemu_check_clean(&path, &format!("{context} after applies"));
    common::assert_qemu_view(
        &path,
        &model.active,
        &format!("{context} qemu read of the state we applied"),
    );

    // Delete them in a scrambled order, checking QEMU's view after each.
    let mut rng = StdRng::seed_from_u64(seed ^ 0xde1e7e);
    while !model.snapshots.is_empty() {
        let pick = rng.gen_range(0..model.snapshots.len());
        let name = model.snapshots[pick].name.clone();
        let mut image = engine::open_rw(&path);
        image
            .delete_snapshot(&name)
            .unwrap_or_else(|e| panic!("{context} delete {name}: {e}"));
        drop(image);
        model.delete_snapshot(&name);
        let ctx = format!("{context} after deleting {name}");
        oracle::assert_qemu_check_clean(&path, &ctx);
        common::assert_check_agrees_with_qemu(&path, &ctx);
        common::assert_qemu_reads_model(&path, &model, &ctx);
    }
}

#[test]
fn qemu_image_64k_v3() {
    engine_handles_qemu_image(8 * MIB, "cluster_size=65536,compat=1.1", 4, 11);
}

#[test]
fn qemu_image_4k_v2() {
    engine_handles_qemu_image(4 * MIB, "cluster_size=4096,compat=0.10", 4, 12);
}

#[test]
fn qemu_image_512_v3() {
    engine_handles_qemu_image(2 * MIB, "cluster_size=512,compat=1.1", 3, 13);
}

#[test]
fn qemu_image_2m_v3() {
    engine_handles_qemu_image(16 * MIB, "cluster_size=2097152,compat=1.1", 3, 14);
}

#[test]
fn qemu_image_4k_v3_refcount64() {
    engine_handles_qemu_image(
        4 * MIB,
        "cluster_size=4096,compat=1.1,refcount_bits=64",
        3,
        15,
    );
}

#[test]
fn qemu_image_64k_v3_zstd() {
    engine_handles_qemu_image(
        8 * MIB,
        "cluster_size=65536,compat=1.1,compression_type=zstd",
        3,
        16,
    );
}

/// Runs QEMU's monitor commands against a qcow2 image with no machine, as `savevm`
/// and `loadvm` need nothing else. Returns the monitor's output.
fn qemu_monitor(path: &Path, commands: &[&str]) -> String {
    let drive = format!("driver=file,filename={},node-name=file0", path.display());
    let mut child = match Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-nographic",
            "-nodefaults",
            "-monitor",
            "stdio",
        ])
        .args([
            "-blockdev",
            &drive,
            "-blockdev",
            "driver=qcow2,file=file0,node-name=disk0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("cannot run qemu-system-x86_64 ({e}): run scripts/setup.sh"),
    };
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for command in commands {
            writeln!(stdin, "{command}").unwrap();
        }
        writeln!(stdin, "quit").unwrap();
    }
    let output = child
        .wait_with_output()
        .expect("qemu-system-x86_64 finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "QEMU failed: {text}");
    text
}

/// Snapshots with VM state (made by QEMU's `savevm`): we list their VM state size and
/// clock, keep the VM state through other snapshots' deletion and our own snapshots, so
/// that QEMU's `loadvm` still loads it; deleting it frees its VM state clusters.
#[test]
fn savevm_snapshots_keep_their_vm_state() {
    let scratch = Scratch::new();
    let path = scratch.path("vmstate.qcow2");
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=65536,compat=1.1");
    qemu_io(&path, &["write -P 0x41 0 128k"]);
    qemu_monitor(&path, &["savevm vm1"]);
    qemu_io(&path, &["write -P 0x42 64k 128k"]);
    qemu_monitor(&path, &["savevm vm2"]);
    let qemu_list = oracle::qemu_snapshots(&path);
    assert!(
        qemu_list.iter().all(|s| s.vm_state_size > 0),
        "savevm stored VM state"
    );

    let mut image = engine::open_rw(&path);
    let ours = image.snapshots();
    for (our, theirs) in ours.iter().zip(&qemu_list) {
        assert_eq!(
            our.vm_state_size, theirs.vm_state_size,
            "vm state size of {}",
            theirs.name
        );
        assert_eq!(
            our.vm_clock_nsec, theirs.vm_clock_nsec,
            "vm clock of {}",
            theirs.name
        );
    }
    image.create_snapshot("disk-only").expect("our snapshot");
    image
        .delete_snapshot("vm1")
        .expect("delete a VM-state snapshot");
    image.write_at(0, &[0x43; 4096]).expect("write");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after deleting vm1");

    let after = oracle::qemu_snapshots(&path);
    let vm2 = after.iter().find(|s| s.name == "vm2").expect("vm2 remains");
    let vm2_before = qemu_list.iter().find(|s| s.name == "vm2").unwrap();
    assert_eq!(
        vm2, vm2_before,
        "vm2's table entry is unchanged by our table rewrites"
    );
    let our_snapshot = after
        .iter()
        .find(|s| s.name == "disk-only")
        .expect("ours listed");
    assert_eq!(our_snapshot.vm_state_size, 0);

    let output = qemu_monitor(&path, &["loadvm vm2", "info snapshots"]);
    assert!(
        !output.contains("Error"),
        "QEMU could not load vm2 after our changes: {output}"
    );
    oracle::assert_qemu_check_clean(&path, "after QEMU loaded vm2");
}

/// iotest 029's "huge VM state": data in the VM-state area far beyond the disk end
/// (1 TiB), kept in a snapshot; our apply and delete must carry the large L1.
#[test]
fn vm_state_area_beyond_disk_end() {
    let scratch = Scratch::new();
    let path = scratch.path("huge-vmstate.qcow2");
    oracle::qemu_create(&path, 64 * MIB, "cluster_size=65536,compat=1.1");
    qemu_io(&path, &["write -b -P 0x11 1T 4k"]);
    oracle::qemu_img_ok(&["snapshot", "-c", "foo", path.to_str().unwrap()]);
    let mut image = engine::open_rw(&path);
    image
        .apply_snapshot("foo")
        .expect("apply a snapshot with a 1 TiB VM state area");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after apply");
    qemu_io(&path, &["read -b -P 0x11 1T 4k"]);
    let mut image = engine::open_rw(&path);
    image.delete_snapshot("foo").expect("delete it");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after delete");
    qemu_io(&path, &["read -b -P 0x11 1T 4k"]);
}

/// Snapshots of different disk sizes (QEMU lets images with snapshots grow): applying
/// one restores its disk size, as QEMU's apply does; the L1 sizes differ too.
#[test]
fn apply_restores_the_snapshot_disk_size() {
    let scratch = Scratch::new();
    let path = scratch.path("resized.qcow2");
    let p = path.to_str().unwrap();
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=1024,compat=1.1");
    qemu_io(&path, &["write -P 0x51 0 64k"]);
    oracle::qemu_img_ok(&["snapshot", "-c", "small", p]);
    let small = oracle::qemu_read_raw(&path, None);
    oracle::qemu_img_ok(&["resize", "-f", "qcow2", p, "12M"]);
    qemu_io(&path, &["write -P 0x52 10M 64k"]);
    oracle::qemu_img_ok(&["snapshot", "-c", "large", p]);
    let large = oracle::qemu_read_raw(&path, None);

    let mut image = engine::open_rw(&path);
    let sizes: Vec<u64> = image.snapshots().iter().map(|s| s.disk_size).collect();
    assert_eq!(sizes, [4 * MIB, 12 * MIB], "snapshot disk sizes");
    image
        .apply_snapshot("small")
        .expect("apply the smaller snapshot");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after applying the smaller snapshot");
    let info = oracle::qemu_info(&path);
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(4 * MIB),
        "apply restored 4 MiB"
    );
    common::assert_qemu_view(&path, &small, "small state");

    let mut image = engine::open_rw(&path);
    image
        .apply_snapshot("large")
        .expect("apply the larger snapshot");
    drop(image);
    oracle::assert_qemu_check_clean(&path, "after applying the larger snapshot");
    let info = oracle::qemu_info(&path);
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(12 * MIB),
        "apply restored 12 MiB"
    );
    common::assert_qemu_view(&path, &large, "large state");
}

/// iotest 029's first case with 1 KiB clusters: a snapshot of an empty disk (small L1)
/// applied after writes that grew nothing but filled many L2 tables.
#[test]
fn apply_snapshot_with_smaller_l1_of_empty_disk() {
    let scratch = Scratch::new();
    let path = scratch.path("029.qcow2");
    oracle::qemu_create(&path, 16 * MIB, "cluster_size=1024,compat=1.1");
    oracle::qemu_img_ok(&["snapshot", "-c", "foo", path.to_str().unwrap()]);
    qemu_io(&path, &["write -P 0x61 0 4M"]);
    let mut image = engine::open_rw(&path);
    image.apply_snapshot("foo").expect("apply");
    let all = engine::read_all(&mut image, 16 * MIB);
    assert!(
        all.iter().all(|&b| b == 0),
        "the empty snapshot reads as zeros"
    );
    drop(image);
    oracle::assert_qemu_check_clean(&path, "029 after apply");
    let check = oracle::qemu_check(&path);
    assert_eq!(
        check.count("allocated-clusters"),
        0,
        "the 4 MiB of data were freed"
    );
}
