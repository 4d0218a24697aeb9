//! The test guest against real QEMU (TCG): its writes reach the host image,
//! its checksums read the disk, its RAM value survives a memory save and
//! restore into a new QEMU, and the driver resynchronises across all of it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{check_image_clean, create_image, image_contents, Qmp};
use serde_json::json;
use vmsnap_testguest::{
    pattern_bytes, pattern_checksum, sha256_hex, DiskFormat, ErrorKind, QemuGuest,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// Applies a pattern write to a host-side model of the disk.
fn model_write(model: &mut [u8], offset: u64, len: u64, seed: u64) {
    let bytes = pattern_bytes(offset, len, seed).unwrap();
    model[offset as usize..(offset + len) as usize].copy_from_slice(&bytes);
}

/// Bytes written by the guest to all its disks, from QEMU's block statistics.
fn total_written_bytes(qmp: &mut Qmp) -> u64 {
    let stats = qmp.execute("query-blockstats", json!({}));
    stats
        .as_array()
        .expect("query-blockstats returns a list")
        .iter()
        .map(|entry| entry["stats"]["wr_bytes"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn writes_are_durable_in_the_host_image_and_checksums_read_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("a.qcow2");
    let raw = dir.path().join("b.raw");
    create_image(&qcow2, "qcow2", "64M");
    create_image(&raw, "raw", "8M");

    let started = Instant::now();
    let mut vm = QemuGuest::builder(dir.path().join("run"))
        .disk(&qcow2, DiskFormat::Qcow2)
        .disk(&raw, DiskFormat::Raw)
        .launch()
        .unwrap();
    let mut guest = vm.connect(BOOT_TIMEOUT).unwrap();
    eprintln!("boot to ready: {:?}", started.elapsed());

    let disks = guest.disks().unwrap();
    let sizes: Vec<(&str, u64)> = disks.iter().map(|d| (d.name.as_str(), d.size)).collect();
    assert_eq!(sizes, [("vda", 64 * MIB), ("vdb", 8 * MIB)]);

    let mut model_a = vec![0u8; (64 * MIB) as usize];
    let mut model_b = vec![0u8; (8 * MIB) as usize];
    // Within one cluster, across cluster boundaries, at the very end, and a
    // partial overwrite of an earlier write with another seed.
    let writes_a = [
        (0, 4096, 1),
        (65536 - 1024, 3072, 2),
        (5 * MIB + 512, MIB, 3),
        (64 * MIB - 8192, 8192, 4),
        (5 * MIB + 4096, 1024, 5),
    ];
    for (offset, len, seed) in writes_a {
        guest.write_pattern("vda", offset, len, seed).unwrap();
        model_write(&mut model_a, offset, len, seed);
    }
    guest
        .write_pattern("vdb", 3 * MIB, 65536, u64::MAX)
        .unwrap();
    model_write(&mut model_b, 3 * MIB, 65536, u64::MAX);

    assert_eq!(
        guest.disk_checksum("vda", 0, 4096).unwrap(),
        pattern_checksum(0, 4096, 1).unwrap()
    );
    assert_eq!(
        guest.disk_checksum("vdb", 3 * MIB, 65536).unwrap(),
        pattern_checksum(3 * MIB, 65536, u64::MAX).unwrap()
    );
    let overwritten = 5 * MIB..6 * MIB + 512;
    assert_eq!(
        guest
            .disk_checksum("vda", overwritten.start, MIB + 512)
            .unwrap(),
        sha256_hex(&model_a[overwritten.start as usize..overwritten.end as usize])
    );
    assert_eq!(
        guest.disk_checksum("vda", 32 * MIB, 65536).unwrap(),
        sha256_hex(&[0u8; 65536])
    );

    // Bad requests: rejected on the host or by the guest, connection intact.
    let beyond = guest.write_pattern("vda", 64 * MIB, 512, 1).unwrap_err();
    assert_eq!(beyond.kind(), ErrorKind::GuestRejected, "{beyond}");
    let missing = guest.disk_checksum("vdz", 0, 512).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::GuestRejected, "{missing}");
    let unaligned = guest.write_pattern("vda", 100, 512, 1).unwrap_err();
    assert_eq!(unaligned.kind(), ErrorKind::InvalidArgument);
    let bad_name = guest.disk_checksum("vda;reboot", 0, 512).unwrap_err();
    assert_eq!(bad_name.kind(), ErrorKind::InvalidArgument);

    // RAM value and counter.
    assert_eq!(guest.ram_value().unwrap(), "");
    let tricky = r"  two  spaces & $HOME * \n back\slash -n ünï";
    guest.set_ram_value(tricky).unwrap();
    assert_eq!(guest.ram_value().unwrap(), tricky);
    let first = guest.counter().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = guest.counter().unwrap();
    assert!(
        second > first,
        "counter did not tick: {first} then {second}"
    );

    // A client that vanished mid-line does not confuse the next one.
    let boot_id = guest.ping().unwrap();
    drop(guest);
    // It may also have left a long request running: the next client's
    // resync waits for it, because the guest serves requests in order.
    // (QEMU drops bytes it has not read when a client hangs up, so the stray
    // client stays until QMP shows the guest writing, i.e. the request is in.)
    let mut qmp = Qmp::connect(&vm.qmp_socket());
    let written_before = total_written_bytes(&mut qmp);
    let mut stray = UnixStream::connect(vm.ctl_socket()).unwrap();
    let request = format!("\nstale-0 write vdb 0 {} {:016x}\n", 2 * MIB, 9);
    stray.write_all(request.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while total_written_bytes(&mut qmp) == written_before {
        assert!(
            Instant::now() < deadline,
            "guest never started the stray write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stray.write_all(b"stale-1 set half a li").unwrap();
    drop(stray);
    model_write(&mut model_b, 0, 2 * MIB, 9);
    let mut guest = vm.connect(BOOT_TIMEOUT).unwrap();
    assert_eq!(guest.boot_id(), boot_id);
    assert_eq!(guest.ram_value().unwrap(), tricky);
    assert_eq!(
        guest.disk_checksum("vdb", 0, 2 * MIB).unwrap(),
        pattern_checksum(0, 2 * MIB, 9).unwrap()
    );

    // Durable when the call returned: a SIGKILLed QEMU loses nothing.
    vm.kill().unwrap();
    check_image_clean(&qcow2);
    assert!(
        image_contents(&qcow2, "qcow2") == model_a,
        "vda image differs from the model"
    );
    assert!(
        std::fs::read(&raw).unwrap() == model_b,
        "vdb image differs from the model"
    );
}

#[test]
fn memory_save_and_restore_into_a_new_qemu_keeps_ram_disk_and_counter() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.qcow2");
    let state = dir.path().join("memory.state");
    create_image(&disk, "qcow2", "32M");

    let mut vm = QemuGuest::builder(dir.path().join("run1"))
        .disk(&disk, DiskFormat::Qcow2)
        .launch()
        .unwrap();
    let mut guest = vm.connect(BOOT_TIMEOUT).unwrap();
    guest.write_pattern("vda", MIB, 65536, 42).unwrap();
    guest.set_ram_value("before snapshot").unwrap();
    let boot_id = guest.ping().unwrap();
    let counter_at_save = guest.counter().unwrap();
    // The snapshot catches a half-written request in the guest's buffers,
    // as a real revert would when taken mid-conversation.
    drop(guest);
    let mut stray = UnixStream::connect(vm.ctl_socket()).unwrap();
    stray
        .write_all(b"old-7 set overwritten-by-a-half-li")
        .unwrap();
    drop(stray);

    let mut qmp = Qmp::connect(&vm.qmp_socket());
    qmp.execute("stop", json!({}));
    // "completed" means QEMU closed the pipe, not that `cat` has written
    // everything: the rename marks the moment the file is whole.
    let partial = dir.path().join("memory.partial");
    let uri = format!(
        "exec:cat > {} && mv {} {}",
        partial.display(),
        partial.display(),
        state.display()
    );
    qmp.execute("migrate", json!({ "uri": uri }));
    qmp.wait_migration_completed(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.exists() {
        assert!(
            Instant::now() < deadline,
            "memory state file never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = qmp.try_execute("quit", json!({}));
    assert!(vm.wait_exit(Duration::from_secs(20)).unwrap().is_some());
    drop(vm);

    let restore_started = Instant::now();
    let mut vm = QemuGuest::builder(dir.path().join("run2"))
        .disk(&disk, DiskFormat::Qcow2)
        .incoming_defer()
        .arg("-S")
        .launch()
        .unwrap();
    let mut qmp = Qmp::connect(&vm.qmp_socket());
    let uri = format!("exec:cat {}", state.display());
    qmp.execute("migrate-incoming", json!({ "uri": uri }));
    qmp.wait_migration_completed(Duration::from_secs(60));
    qmp.execute("cont", json!({}));
    let mut guest = vm.connect(Duration::from_secs(30)).unwrap();
    eprintln!("restore to ready: {:?}", restore_started.elapsed());

    assert_eq!(
        guest.boot_id(),
        boot_id,
        "guest rebooted instead of resuming"
    );
    assert_eq!(guest.ram_value().unwrap(), "before snapshot");
    assert_eq!(
        guest.disk_checksum("vda", MIB, 65536).unwrap(),
        pattern_checksum(MIB, 65536, 42).unwrap()
    );
    let counter = guest.counter().unwrap();
    assert!(
        counter >= counter_at_save && counter < counter_at_save + 1000,
        "counter {counter} does not continue from {counter_at_save}"
    );
    guest.set_ram_value("after restore").unwrap();
    assert_eq!(guest.ram_value().unwrap(), "after restore");

    // ACPI power button (what a domain shutdown sends) powers the guest off.
    qmp.execute("system_powerdown", json!({}));
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.is_some(), "guest ignored the ACPI power button");
    check_image_clean(&disk);
}

#[test]
fn poweroff_request_stops_the_vm_and_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.qcow2");
    create_image(&disk, "qcow2", "16M");

    let missing = vmsnap_testguest::Guest::connect(
        dir.path().join("nothing.sock"),
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Timeout);

    let mut vm = QemuGuest::builder(dir.path().join("run"))
        .disk(&disk, DiskFormat::Qcow2)
        .launch()
        .unwrap();
    let mut guest = vm.connect(BOOT_TIMEOUT).unwrap();
    guest.poweroff().unwrap();
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.is_some(), "QEMU still running after poweroff");
    let gone = guest.ping().unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::Disconnected, "{gone}");

    let broken = QemuGuest::builder(dir.path().join("run2"))
        .disk(dir.path().join("does-not-exist.qcow2"), DiskFormat::Qcow2)
        .launch()
        .unwrap_err();
    assert_eq!(broken.kind(), ErrorKind::Qemu, "{broken}");
    assert!(broken.to_string().contains("does-not-exist"), "{broken}");
}
