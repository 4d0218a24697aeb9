//! `vmsnap check DOM [-r leaks|all]` end to end with real qemu-img: a clean
//! domain passes; leaked clusters are reported and repaired until `qemu-img
//! check` is clean; orphaned files in the snapshot area are reported and
//! removed while needed and user files stay; records pointing at missing
//! files or internal snapshots are reported with exit 2 and never deleted;
//! images a running QEMU has open are checked but not repaired.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hardening::{DiskDef, Lab};
use serde_json::Value;
use vmsnap_core::snapshot::orchestrate::SnapshotStore;
use vmsnap_core::Host;

const VDA: DiskDef<'static> = DiskDef {
    target: "vda",
    file: "disk.qcow2",
    format: "qcow2",
};

/// A stopped domain `name` on a 64 MiB qcow2 disk holding 1 MiB of 0x5a.
fn domain(lab: &Lab, name: &str) -> PathBuf {
    lab.qemu_img_create(&["-f", "qcow2", VDA.file, "64M"]);
    let disk = lab.path(VDA.file);
    qemu_io(&disk, "write -P 0x5a 0 1M");
    lab.define(name, &[VDA]);
    disk
}

fn qemu_io(image: &Path, command: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command])
        .arg(image)
        .output()
        .expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("fail") && !stdout.contains("error"),
        "qemu-io {command} {}: {stdout}{}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check`'s exit status (`-U`: QEMU may have the image open).
fn qemu_img_check(image: &Path) -> i32 {
    Command::new("qemu-img")
        .args(["check", "-U", "-q", "-f", "qcow2"])
        .arg(image)
        .output()
        .expect("qemu-img")
        .status
        .code()
        .expect("exit code")
}

/// Leaks `count` clusters in a 64 KiB-cluster, 16-bit-refcount image, the
/// way a crash between a refcount update and the table write leaves them:
/// the file grows by `count` clusters whose refcount is 1 and that nothing
/// references.
fn leak_clusters(image: &Path, count: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 48).unwrap();
    let refcount_table = u64::from_be_bytes(word);
    file.read_exact_at(&mut word, refcount_table).unwrap();
    let refcount_block = u64::from_be_bytes(word);
    let mut order = [0u8; 4];
    file.read_exact_at(&mut order, 96).unwrap();
    assert_eq!(u32::from_be_bytes(order), 4, "16-bit refcounts expected");
    let cluster = 65536;
    let first = file.metadata().unwrap().len().div_ceil(cluster);
    file.set_len((first + count) * cluster).unwrap();
    for index in first..first + count {
        file.write_all_at(&1u16.to_be_bytes(), refcount_block + index * 2)
            .unwrap();
    }
    file.sync_all().unwrap();
}

/// Sets the refcount of the image's last cluster (guest data, written
/// last) to 0: qemu-img counts two errors (the refcount and the L2
/// entry's COPIED flag).
fn drop_last_refcount(image: &Path) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 48).unwrap();
    let refcount_table = u64::from_be_bytes(word);
    file.read_exact_at(&mut word, refcount_table).unwrap();
    let refcount_block = u64::from_be_bytes(word);
    let last = file.metadata().unwrap().len().div_ceil(65536) - 1;
    file.write_all_at(&0u16.to_be_bytes(), refcount_block + last * 2)
        .unwrap();
    file.sync_all().unwrap();
}

fn check(lab: &Lab, args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out: Output = lab.run(&all);
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.code().expect("exit code"), stdout)
}

fn check_json(lab: &Lab, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, stdout) = check(lab, &all);
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(doc["exit_code"], code, "{stdout}");
    doc
}

fn snapshot_area(lab: &Lab, domain: &str) -> PathBuf {
    lab.state().join("domains").join(domain).join("snapshots")
}

fn image<'a>(doc: &'a Value, path: &Path) -> &'a Value {
    doc["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == path.to_str().unwrap())
        .unwrap_or_else(|| panic!("{} not checked: {doc:#}", path.display()))
}

#[test]
fn a_clean_domain_passes_and_every_image_is_checked() {
    let lab = Lab::new("check-clean");
    let disk = domain(&lab, "clean");
    lab.ok(&["snapshot-create-as", "clean", "s1"]);
    lab.ok(&[
        "snapshot-create-as",
        "clean",
        "s2",
        "--disk-only",
        "--external",
    ]);

    let (code, out) = check(&lab, &["clean"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No problems found"), "{out}");
    assert!(out.contains("2 image(s)"), "{out}");

    let doc = check_json(&lab, &["clean"]);
    assert_eq!(doc["findings"], Value::Array(vec![]));
    assert_eq!(doc["running"], false);
    let base = image(&doc, &disk);
    assert_eq!(base["internal_snapshots"][0]["name"], "s1");
    assert_eq!(base["leaks"], 0);
    let overlay = snapshot_area(&lab, "clean").join("vda.s2.qcow2");
    assert_eq!(image(&doc, &overlay)["used_by"][0], "current vda");

    let (code, out) = check(&lab, &["nosuch"]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn an_interrupted_operation_is_finished_first_and_reported() {
    let lab = Lab::new("check-recover");
    domain(&lab, "intr");
    let out = lab
        .command(&[
            "snapshot-create-as",
            "intr",
            "x1",
            "--disk-only",
            "--external",
        ])
        .env("VMSNAP_FAILPOINTS", "snapshot.create.create-overlays")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed at the failpoint");
    let (code, out) = check(&lab, &["intr"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("recovery: rolled back the interrupted create of snapshot 'x1'"),
        "{out}"
    );
    assert!(out.contains("No problems found"), "{out}");
    assert_eq!(lab.snapshot_names("intr"), Vec::<String>::new());
    let doc = check_json(&lab, &["intr"]);
    assert_eq!(doc["recovery"], Value::Array(vec![]), "recovered once");
}

#[test]
fn leaked_clusters_are_reported_then_repaired_without_touching_data() {
    let lab = Lab::new("check-leaks");
    let disk = domain(&lab, "leaky");
    lab.ok(&["snapshot-create-as", "leaky", "s1"]);
    leak_clusters(&disk, 3);
    assert_eq!(qemu_img_check(&disk), 3, "the poke must leak clusters");

    let (code, out) = check(&lab, &["leaky"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("3 leaked cluster(s)"), "{out}");
    assert!(out.contains("-r leaks"), "{out}");
    assert_eq!(
        qemu_img_check(&disk),
        3,
        "a check without -r changes nothing"
    );

    let doc = check_json(&lab, &["leaky", "-r", "leaks"]);
    assert_eq!(doc["exit_code"], 0, "{doc:#}");
    let repaired = image(&doc, &disk);
    assert_eq!(repaired["leaks_fixed"], 3, "{doc:#}");
    assert_eq!(repaired["leaks"], 0, "{doc:#}");
    assert_eq!(qemu_img_check(&disk), 0, "qemu-img agrees after repair");
    qemu_io(&disk, "read -P 0x5a 0 1M");

    let (code, out) = check(&lab, &["leaky"]);
    assert_eq!(
        (code, out.contains("No problems found")),
        (0, true),
        "{out}"
    );
    assert_eq!(lab.snapshot_names("leaky"), ["s1"]);
}

#[test]
fn refcount_errors_are_left_to_repair_all() {
    let lab = Lab::new("check-refcount");
    let disk = domain(&lab, "refs");
    drop_last_refcount(&disk);
    assert_eq!(qemu_img_check(&disk), 2, "the poke must corrupt a refcount");

    for repair in [&[][..], &["-r", "leaks"][..]] {
        let mut args = vec!["refs"];
        args.extend_from_slice(repair);
        let (code, out) = check(&lab, &args);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&format!(
                "corruption: image {}: 2 corruption(s)",
                disk.display()
            )) && out.contains("`-r all` may fix"),
            "{out}"
        );
    }
    assert_eq!(qemu_img_check(&disk), 2, "-r leaks leaves refcount errors");

    let (code, out) = check(&lab, &["refs", "-r", "all"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("repaired: image"), "{out}");
    assert_eq!(qemu_img_check(&disk), 0);
    qemu_io(&disk, "read -P 0x5a 0 1M");
}

#[test]
fn orphaned_files_are_removed_by_repair_and_nothing_else() {
    let lab = Lab::new("check-orphans");
    let disk = domain(&lab, "orph");
    lab.ok(&[
        "snapshot-create-as",
        "orph",
        "s2",
        "--disk-only",
        "--external",
    ]);
    let area = snapshot_area(&lab, "orph");
    let overlay = area.join("vda.s2.qcow2");
    // An overlay vmsnap still records as its own (as when its removal
    // failed), and a memory image it no longer records (as
    // `snapshot-delete --metadata` leaves one).
    let ghost_overlay = area.join("vda.ghost.qcow2");
    let ghost_memory = area.join("ghost.mem");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&disk)
        .arg(&ghost_overlay)
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::write(&ghost_memory, b"stale migration stream").unwrap();
    let host = Host::open(Some(&lab.state())).unwrap();
    SnapshotStore::new(host.store())
        .unwrap()
        .own("orph", std::slice::from_ref(&ghost_overlay))
        .unwrap();
    // A file of the user's outside the state directory is never vmsnap's.
    let user_file = lab.path("user.mem");
    fs::write(&user_file, b"keep me").unwrap();

    let (code, out) = check(&lab, &["orph"]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!(
            "leak: overlay {} is needed neither by a snapshot nor by the current state; `-r leaks` removes it",
            ghost_overlay.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("leak: memory image {}", ghost_memory.display()))
            && out.contains("`-r all` removes it"),
        "{out}"
    );
    assert!(!out.contains(&overlay.display().to_string()), "{out}");
    assert!(ghost_overlay.exists() && ghost_memory.exists());

    let (code, out) = check(&lab, &["orph", "--repair", "leaks"]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(&format!(
            "repaired: removed orphaned overlay {}",
            ghost_overlay.display()
        )),
        "{out}"
    );
    assert!(!ghost_overlay.exists() && ghost_memory.exists());
    let owned = SnapshotStore::new(host.store())
        .unwrap()
        .owned_files("orph")
        .unwrap();
    assert!(!owned.contains(&ghost_overlay), "{owned:?}");

    let doc = check_json(&lab, &["orph", "-r", "all"]);
    assert_eq!(doc["exit_code"], 0, "{doc:#}");
    assert_eq!(doc["findings"][0]["kind"], "unrecorded-file");
    assert_eq!(doc["findings"][0]["repaired"], true);
    assert!(!ghost_memory.exists());
    assert!(overlay.exists() && disk.exists());
    assert_eq!(fs::read(&user_file).unwrap(), b"keep me");
    assert_eq!(check(&lab, &["orph"]).0, 0);
    assert_eq!(lab.snapshot_names("orph"), ["s2"]);
}

#[test]
fn records_of_missing_files_and_tags_are_reported_and_kept() {
    let lab = Lab::new("check-missing");
    let disk = domain(&lab, "miss");
    lab.ok(&["snapshot-create-as", "miss", "s1"]);
    lab.ok(&[
        "snapshot-create-as",
        "miss",
        "s2",
        "--disk-only",
        "--external",
    ]);
    lab.ok(&[
        "snapshot-create-as",
        "miss",
        "s3",
        "--disk-only",
        "--external",
    ]);
    // Back to s2: s3 alone needs s2's overlay (frozen by s3) now.
    lab.ok(&["snapshot-revert", "miss", "s2"]);
    let frozen = snapshot_area(&lab, "miss").join("vda.s2.qcow2");
    fs::remove_file(&frozen).unwrap();
    // s1's internal snapshot vanishes; one made outside vmsnap appears.
    let out = Command::new("qemu-img")
        .args(["snapshot", "-d", "s1"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("qemu-img")
        .args(["snapshot", "-c", "by-hand"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success());

    for args in [&["miss"][..], &["miss", "-r", "all"][..]] {
        let (code, out) = check(&lab, args);
        assert_eq!(code, 2, "{out}");
        assert!(
            out.contains(&format!(
                "corruption: snapshot 's3' cannot be reverted: frozen image {} of disk vda is missing",
                frozen.display()
            )),
            "{out}"
        );
        assert!(
            out.contains("snapshot 's1' cannot be reverted")
                && out.contains("no internal snapshot 's1'"),
            "{out}"
        );
        assert!(
            out.contains("notice: ") && out.contains("'by-hand'"),
            "{out}"
        );
    }
    assert_eq!(lab.snapshot_names("miss"), ["s1", "s2", "s3"]);
    assert!(Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&disk)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("by-hand"))
        .unwrap());

    lab.ok(&["snapshot-delete", "miss", "s1", "--metadata"]);
    lab.ok(&["snapshot-delete", "miss", "s3", "--metadata"]);
    let doc = check_json(&lab, &["miss"]);
    assert_eq!(doc["exit_code"], 0, "{doc:#}");
    assert_eq!(doc["findings"][0]["kind"], "unrecorded-internal-snapshot");
}

#[test]
fn a_running_domain_is_checked_read_only_and_a_lost_memory_image_reported() {
    let lab = Lab::new("check-live");
    let disk = domain(&lab, "live");
    lab.ok(&["start", "live"]);
    lab.ok(&["snapshot-create-as", "live", "m1", "--external"]);
    let memory = snapshot_area(&lab, "live").join("m1.mem");
    assert!(memory.exists());

    let doc = check_json(&lab, &["live"]);
    assert_eq!(doc["exit_code"], 0, "{doc:#}");
    assert_eq!(doc["running"], true);
    assert_eq!(image(&doc, &disk)["live"], true);

    // The base is a read-only backing layer of the running QEMU now.
    leak_clusters(&disk, 2);
    let (code, out) = check(&lab, &["live", "-r", "leaks"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("repair needs the domain stopped"), "{out}");
    assert_eq!(qemu_img_check(&disk), 3, "nothing repaired under QEMU");

    lab.ok(&["destroy", "live"]);
    fs::remove_file(&memory).unwrap();
    let (code, out) = check(&lab, &["live"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "corruption: snapshot 'm1' cannot be reverted: memory image {} is missing",
            memory.display()
        )),
        "{out}"
    );
    let (code, out) = check(&lab, &["live", "-r", "leaks"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("repaired 2 leaked cluster(s)"), "{out}");
    assert_eq!(qemu_img_check(&disk), 0);
    assert_eq!(lab.snapshot_names("live"), ["m1"]);
}
