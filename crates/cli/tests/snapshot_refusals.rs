//! QEMU refusing a command mid-way (issue 4, "Bad input"): an external
//! memory+disk snapshot whose `migrate` QEMU refuses only after the disks
//! were switched to their overlays. The guest carries an `ivshmem-plain`
//! device in peer mode, a migration blocker QEMU 7.2 accepts everything else
//! with (`blockdev-add`, the `transaction`, the background-snapshot
//! capability) before it refuses `migrate`. vmsnap must then give one line
//! and a non-zero exit, leave the VM running (or paused) as before on its
//! original image with the overlay's writes committed back, record no
//! snapshot and leave no file behind; a disk-only snapshot, which needs no
//! migration, must still work afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::{pattern_checksum, sha256_hex, Guest};

const DOMAIN: &str = "refuse";
/// Size of the guest's disk and of each pattern written to it.
const DISK_SIZE: &str = "16M";
const CHUNK: u64 = 1 << 20;

/// QEMU arguments that block migration: ivshmem without `master=on` runs in
/// peer mode, which QEMU 7.2 will not migrate.
const MIGRATION_BLOCKER: [&str; 4] = [
    "-object",
    "memory-backend-memfd,id=refusals-shm,size=1M,share=on",
    "-device",
    "ivshmem-plain,memdev=refusals-shm",
];

/// Where the guest keeps writing while a snapshot of it is refused: 64 KiB
/// patterns from 4 MiB on, each at its own offset with its own seed.
const BUSY_START: u64 = 4 << 20;
const BUSY_LEN: u64 = 64 << 10;
const BUSY_MAX_WRITES: u64 = 128;

/// Runs `during` while the guest writes patterns to vda without pause (so
/// some land on the overlay between the switch and the undo, wherever the
/// timing puts them); returns what `during` returned and the (offset, seed)
/// of every write the guest confirmed.
fn while_guest_writes<T>(guest: &mut Guest, during: impl FnOnce() -> T) -> (T, Vec<(u64, u64)>) {
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut written = Vec::new();
            for i in 0..BUSY_MAX_WRITES {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let (offset, seed) = (BUSY_START + i * BUSY_LEN, 100 + i);
                guest.write_pattern("vda", offset, BUSY_LEN, seed).unwrap();
                written.push((offset, seed));
            }
            written
        });
        let result = during();
        done.store(true, Ordering::SeqCst);
        (result, writer.join().expect("the guest writer panicked"))
    })
}

/// Every file in the test directory and the state directory, except the
/// ones that come and go with QEMU (sockets, the serial log).
fn files(cli: &VmsnapCli) -> Vec<PathBuf> {
    let mut files = lab::files_under(cli.dir());
    files.retain(|path| {
        !path.to_string_lossy().contains("serial.log")
            && !path.extension().is_some_and(|e| e == "sock")
    });
    files
}

/// The guest-visible content of a qcow2 image, read from the host (QEMU may
/// hold the image).
fn image_bytes(cli: &VmsnapCli, image: &Path) -> Vec<u8> {
    let raw = cli.path("image-read.raw");
    lab::qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let bytes = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    bytes
}

/// sha256 of `offset..offset+len` of `bytes`.
fn range_checksum(bytes: &[u8], offset: u64, len: u64) -> String {
    let start = usize::try_from(offset).unwrap();
    let end = start + usize::try_from(len).unwrap();
    sha256_hex(&bytes[start..end])
}

/// sha256 of `offset..offset+len` of the guest-visible content of a qcow2
/// image, read from the host.
fn image_checksum(cli: &VmsnapCli, image: &Path, offset: u64, len: u64) -> String {
    range_checksum(&image_bytes(cli, image), offset, len)
}

/// What a refused snapshot must leave exactly as it was.
struct Before {
    names: String,
    disks: String,
    files: Vec<PathBuf>,
}

impl Before {
    fn take(cli: &VmsnapCli) -> Before {
        Before {
            names: cli.ok(&["snapshot-list", DOMAIN, "--name"]),
            disks: cli.ok(&["domblklist", DOMAIN]),
            files: files(cli),
        }
    }

    fn assert_unchanged(&self, cli: &VmsnapCli, context: &str) {
        assert_eq!(
            cli.ok(&["snapshot-list", DOMAIN, "--name"]),
            self.names,
            "{context}: a snapshot was recorded"
        );
        assert_eq!(
            cli.ok(&["domblklist", DOMAIN]),
            self.disks,
            "{context}: the disk is not back on its original image"
        );
        assert_eq!(files(cli), self.files, "{context}: files changed");
    }
}

/// Tries the external memory+disk snapshot `name`, which QEMU's refusal of
/// `migrate` must turn into a clean refusal; the overlay and memory
/// files it named must not exist afterwards.
fn refused_external_snapshot(cli: &VmsnapCli, name: &str) {
    let memory = cli.path(&format!("{name}.mem"));
    let overlay = cli.path(&format!("vda.{name}.qcow2"));
    let memspec = format!("file={},snapshot=external", memory.display());
    let diskspec = format!("vda,snapshot=external,file={}", overlay.display());
    let steps = tempfile::NamedTempFile::new().unwrap();
    let args = [
        "snapshot-create-as",
        DOMAIN,
        name,
        "--memspec",
        &memspec,
        "--diskspec",
        &diskspec,
    ];
    let out = cli.run_with_env(
        &args,
        &[("VMSNAP_FAILPOINT_LOG", steps.path().to_str().unwrap())],
    );
    let line = lab::refusal(&args, &out);
    // vmsnap runs `migrate` only once the switch transaction succeeded: a
    // refusal naming `migrate`, after the switch step, is the case under test.
    let steps = fs::read_to_string(steps.path()).unwrap();
    assert!(
        steps.lines().any(|step| step == "snapshot.create.switched"),
        "the disks were never switched, so this did not test a refusal after the switch; steps: {steps}"
    );
    assert!(
        line.contains("`migrate`") && line.contains("ivshmem"),
        "the refusal should say QEMU would not migrate, and why: {line}"
    );
    for file in [&memory, &overlay] {
        assert!(!file.exists(), "{} left behind", file.display());
    }
}

/// `qemu-img check -U` (QEMU holds the image) finds it perfectly clean: no
/// corruption and no leaked cluster either.
fn assert_check_clean(image: &Path, context: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{context}: {} does not check clean: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest is on its original image and writes land there: the pattern
/// `seed` written now is read back by the guest and found in vda.qcow2 from
/// the host, which has no backing file (no overlay is left above or below).
fn assert_writes_reach_original(
    guest: &mut Guest,
    cli: &VmsnapCli,
    vda: &Path,
    offset: u64,
    seed: u64,
) {
    guest.write_pattern("vda", offset, CHUNK, seed).unwrap();
    let expected = pattern_checksum(offset, CHUNK, seed).unwrap();
    assert_eq!(guest.disk_checksum("vda", offset, CHUNK).unwrap(), expected);
    assert_eq!(
        image_checksum(cli, vda, offset, CHUNK),
        expected,
        "the guest's write after the refusal is not in the original image"
    );
    let info = lab::qemu_img(&["info", "-U", "--output=json", vda.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(
        info.get("backing-filename").is_none(),
        "the original image gained a backing file: {info}"
    );
    assert_check_clean(vda, "after the refusal");
}

#[test]
fn migrate_refused_after_the_disk_switch_changes_nothing() {
    let cli = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-refusals");
    cli.guard(DOMAIN);
    let vda = cli.path("vda.qcow2");
    lab::create_qcow2(&vda, DISK_SIZE);
    let ctl = cli.control_socket();
    let config = cli.path("refuse.toml");
    fs::write(
        &config,
        lab::guest_domain_toml(
            DOMAIN,
            128,
            &ctl,
            &MIGRATION_BLOCKER,
            &[DiskDef::qcow2("vda", "vda.qcow2")],
        ),
    )
    .unwrap();
    cli.ok(&["define", config.to_str().unwrap()]);
    cli.ok(&["start", DOMAIN]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    guest.write_pattern("vda", 0, CHUNK, 1).unwrap();
    let disk_sum = guest.disk_checksum("vda", 0, CHUNK).unwrap();
    assert_eq!(disk_sum, pattern_checksum(0, CHUNK, 1).unwrap());
    guest.set_ram_value("before the refusal").unwrap();
    let original_disks = cli.ok(&["domblklist", DOMAIN]);
    assert!(
        original_disks.contains(vda.to_str().unwrap()),
        "{original_disks}"
    );

    // A running guest: refused, and it keeps running as before.
    let before = Before::take(&cli);
    let counter_before = guest.counter().unwrap();
    let (_, busy_writes) =
        while_guest_writes(&mut guest, || refused_external_snapshot(&cli, "running"));
    before.assert_unchanged(&cli, "running guest");
    assert!(!busy_writes.is_empty(), "the guest wrote nothing meanwhile");
    let original = image_bytes(&cli, &vda);
    for &(offset, seed) in &busy_writes {
        let expected = pattern_checksum(offset, BUSY_LEN, seed).unwrap();
        assert_eq!(
            range_checksum(&original, offset, BUSY_LEN),
            expected,
            "the guest's write at {offset} during the refused snapshot is not in the original image"
        );
        assert_eq!(
            guest.disk_checksum("vda", offset, BUSY_LEN).unwrap(),
            expected
        );
    }
    assert!(
        cli.ok(&["list"]).contains("running"),
        "{}",
        cli.ok(&["list"])
    );
    thread::sleep(Duration::from_millis(300));
    let counter_after = guest.counter().unwrap();
    assert!(
        counter_after > counter_before,
        "the guest stopped: counter {counter_before} then {counter_after}"
    );
    assert_eq!(guest.ram_value().unwrap(), "before the refusal");
    assert_eq!(guest.disk_checksum("vda", 0, CHUNK).unwrap(), disk_sum);
    assert_writes_reach_original(&mut guest, &cli, &vda, CHUNK, 2);

    // A paused guest: refused, it stays paused, and resumes as before.
    cli.ok(&["suspend", DOMAIN]);
    assert!(
        cli.ok(&["list"]).contains("paused"),
        "{}",
        cli.ok(&["list"])
    );
    let before = Before::take(&cli);
    refused_external_snapshot(&cli, "paused");
    before.assert_unchanged(&cli, "paused guest");
    let list = cli.ok(&["list"]);
    assert!(
        list.contains("paused"),
        "the guest did not stay paused: {list}"
    );
    cli.ok(&["resume", DOMAIN]);
    assert!(
        cli.ok(&["list"]).contains("running"),
        "{}",
        cli.ok(&["list"])
    );
    let counter_before = guest.counter().unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(
        guest.counter().unwrap() > counter_before,
        "the guest did not resume"
    );
    assert_eq!(guest.ram_value().unwrap(), "before the refusal");
    assert_eq!(guest.disk_checksum("vda", 0, CHUNK).unwrap(), disk_sum);
    assert_writes_reach_original(&mut guest, &cli, &vda, 2 * CHUNK, 3);
    assert_eq!(cli.ok(&["domblklist", DOMAIN]), original_disks);
    assert_eq!(cli.ok(&["snapshot-list", DOMAIN, "--name"]).trim(), "");

    // A disk-only external snapshot needs no migration: it still works.
    let overlay = cli.path("vda.disk.qcow2");
    let diskspec = format!("vda,snapshot=external,file={}", overlay.display());
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            DOMAIN,
            "disk",
            "--disk-only",
            "--diskspec",
            &diskspec,
        ]),
        "Domain snapshot disk created\n"
    );
    assert_eq!(cli.ok(&["snapshot-list", DOMAIN, "--name"]).trim(), "disk");
    let disks = cli.ok(&["domblklist", DOMAIN]);
    assert!(disks.contains(overlay.to_str().unwrap()), "{disks}");
    guest.write_pattern("vda", 3 * CHUNK, CHUNK, 4).unwrap();
    assert_eq!(
        image_checksum(&cli, &overlay, 3 * CHUNK, CHUNK),
        pattern_checksum(3 * CHUNK, CHUNK, 4).unwrap(),
        "the guest's write after the disk-only snapshot is not in its overlay"
    );
    assert_eq!(
        image_checksum(&cli, &vda, 3 * CHUNK, CHUNK),
        sha256_hex(&vec![0u8; CHUNK as usize]),
        "the frozen image changed after the disk-only snapshot"
    );
    assert_eq!(
        image_checksum(&cli, &overlay, 0, CHUNK),
        disk_sum,
        "the overlay does not show the data below it"
    );
    assert_eq!(guest.ram_value().unwrap(), "before the refusal");
    assert_check_clean(&overlay, "after the disk-only snapshot");
    assert_check_clean(&vda, "after the disk-only snapshot");
    cli.ok(&["destroy", DOMAIN]);
    lab::assert_qemu_img_check_clean(&overlay, "after destroy");
    lab::assert_qemu_img_check_clean(&vda, "after destroy");
}
