//! `vmsnap snapshot-*` end to end with the test guest (TCG): virsh's messages
//! and formats, `--json`, and clear refusals of bad input that change
//! nothing (DESIGN §5.5): one line on stderr, non-zero exit, the VM still
//! running, no snapshot recorded, no stray file.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::Guest;

/// The vmsnap binary in a fresh directory (`lab::VmsnapCli`), with this
/// file's checks.
struct Bench(VmsnapCli);

impl std::ops::Deref for Bench {
    type Target = VmsnapCli;

    fn deref(&self) -> &VmsnapCli {
        &self.0
    }
}

impl Bench {
    fn new() -> Bench {
        let bench = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-snapcli");
        bench.guard("cli");
        Bench(bench)
    }

    /// Runs a command that must be refused with one line mentioning `needle`.
    fn refused(&self, args: &[&str], needle: &str) {
        let stderr = self.0.refused(args);
        assert!(
            stderr.contains(needle),
            "error for {args:?} should mention {needle:?}: {stderr}"
        );
    }

    /// Every file under the state directory and the test directory.
    fn files(&self) -> Vec<PathBuf> {
        let mut files = lab::files_under(self.dir());
        files.retain(|path| {
            !path.to_string_lossy().contains("serial.log")
                && !path.extension().is_some_and(|e| e == "sock")
        });
        files
    }
}

#[test]
fn snapshot_commands_and_refusals() {
    let bench = Bench::new();
    let vda = bench.path("vda.qcow2");
    lab::create_qcow2(&vda, "32M");
    fs::write(bench.path("vdb.raw"), vec![0u8; 8 << 20]).unwrap();
    let ctl = bench.control_socket();
    let config = bench.write_guest_config(
        "cli",
        160,
        &[
            DiskDef::qcow2("vda", "vda.qcow2"),
            DiskDef::raw("vdb", "vdb.raw"),
        ],
    );
    bench.ok(&["define", config.to_str().unwrap()]);
    bench.ok(&["start", "cli"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    guest.set_ram_value("first").unwrap();
    let files_before = bench.files();

    // Bad input: refused with one line, nothing changes.
    bench.refused(&["snapshot-create-as", "nosuch", "s1"], "nosuch");
    bench.refused(&["snapshot-create-as", "cli", "s1"], "vdb");
    bench.refused(&["snapshot-create-as", "cli", "../x", "--external"], "x");
    let existing = bench.path("exists.mem");
    fs::write(&existing, b"keep me").unwrap();
    let overlay = bench.path("vda.e1.qcow2");
    let memspec = format!("file={},snapshot=external", existing.display());
    let diskspec = format!("vda,snapshot=external,file={}", overlay.display());
    bench.refused(
        &[
            "snapshot-create-as",
            "cli",
            "e1",
            "--memspec",
            &memspec,
            "--diskspec",
            &diskspec,
        ],
        "already exists",
    );
    assert_eq!(fs::read(&existing).unwrap(), b"keep me");
    fs::remove_file(&existing).unwrap();
    bench.refused(&["snapshot-revert", "cli", "nosuch"], "nosuch");
    bench.refused(&["snapshot-delete", "cli", "nosuch"], "nosuch");
    bench.refused(&["snapshot-info", "cli", "nosuch"], "nosuch");
    assert_eq!(bench.ok(&["snapshot-list", "cli", "--name"]).trim(), "");
    assert_eq!(
        bench.files(),
        files_before,
        "a refused command left files behind"
    );
    assert!(
        lab::qemu_img(&["snapshot", "-U", "-l", vda.to_str().unwrap()])
            .trim()
            .is_empty()
    );
    assert!(bench.ok(&["list"]).contains("running"));
    assert_eq!(guest.ram_value().unwrap(), "first");

    // An internal snapshot of the qcow2 disk only.
    assert_eq!(
        bench.ok(&[
            "snapshot-create-as",
            "cli",
            "s1",
            "first one",
            "--diskspec",
            "vdb,snapshot=no"
        ]),
        "Domain snapshot s1 created\n"
    );
    bench.refused(
        &["snapshot-create-as", "cli", "s1", "--external"],
        "already has a snapshot named 's1'",
    );

    // An external snapshot of both disks with memory, with --json.
    guest.set_ram_value("second").unwrap();
    let memory = bench.path("e1.mem");
    let memspec = format!("file={},snapshot=external", memory.display());
    let vdb_overlay = bench.path("vdb.e1.qcow2");
    let diskspec_b = format!("vdb,snapshot=external,file={}", vdb_overlay.display());
    let json: serde_json::Value = serde_json::from_str(&bench.ok(&[
        "snapshot-create-as",
        "cli",
        "e1",
        "--memspec",
        &memspec,
        "--diskspec",
        &diskspec,
        "--diskspec",
        &diskspec_b,
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["name"], "e1");
    assert_eq!(json["kind"], "external");
    assert!(json["pause_ms"].as_f64().unwrap() >= 0.0, "{json}");
    use std::os::unix::fs::PermissionsExt;
    for file in [&memory, &overlay, &vdb_overlay] {
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
    assert_eq!(guest.ram_value().unwrap(), "second");

    // virsh's queries.
    assert_eq!(bench.ok(&["snapshot-current", "cli", "--name"]), "e1\n");
    assert_eq!(bench.ok(&["snapshot-parent", "cli", "e1"]), "s1\n");
    assert_eq!(
        bench.ok(&["snapshot-list", "cli", "--tree"]).trim_end(),
        "s1\n  |\n  +- e1"
    );
    let info = bench.ok(&["snapshot-info", "cli", "e1"]);
    assert!(info.contains("Location:       external"), "{info}");
    assert!(info.contains("State:          running"), "{info}");
    let xml = bench.ok(&["snapshot-dumpxml", "cli", "e1"]);
    assert!(xml.starts_with("<domainsnapshot>"), "{xml}");
    assert!(xml.contains(&memory.display().to_string()), "{xml}");
    let table = bench.ok(&["snapshot-list", "cli"]);
    assert!(
        table.starts_with(" Name   Creation Time               State"),
        "{table}"
    );

    // Reverts, both ways, restore memory.
    guest.set_ram_value("third").unwrap();
    drop(guest);
    assert_eq!(
        bench.ok(&["snapshot-revert", "cli", "s1"]),
        "Domain snapshot s1 reverted\n\n"
    );
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "first");
    drop(guest);
    bench.ok(&["snapshot-revert", "cli", "e1", "--paused"]);
    assert!(bench.ok(&["list"]).contains("paused"));
    bench.ok(&["resume", "cli"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "second");

    // A memory image that disappeared: refused, the VM keeps running.
    fs::rename(&memory, bench.path("moved.mem")).unwrap();
    bench.refused(&["snapshot-revert", "cli", "e1"], "missing");
    assert_eq!(guest.ram_value().unwrap(), "second");
    fs::rename(bench.path("moved.mem"), &memory).unwrap();

    // A memory image that does not fit (ENOSPC on a small tmpfs, where we
    // may mount one): refused, the disks go back, nothing remains.
    let small = bench.path("small");
    fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            small.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        let names_before = bench.ok(&["snapshot-list", "cli", "--name"]);
        let disks_before = bench.ok(&["domblklist", "cli"]);
        let files_before = bench.files();
        let memspec = format!("file={}/full.mem,snapshot=external", small.display());
        bench.refused(
            &["snapshot-create-as", "cli", "full", "--memspec", &memspec],
            "space",
        );
        let leftovers = fs::read_dir(&small).unwrap().count();
        let _ = Command::new("umount").arg(&small).status();
        assert_eq!(
            leftovers, 0,
            "partial memory image left on the full file system"
        );
        assert_eq!(bench.ok(&["snapshot-list", "cli", "--name"]), names_before);
        assert_eq!(bench.ok(&["domblklist", "cli"]), disks_before);
        assert_eq!(
            bench.files(),
            files_before,
            "a failed snapshot left files behind"
        );
        assert!(bench.ok(&["list"]).contains("running"));
        assert_eq!(guest.ram_value().unwrap(), "second");
    }

    // Deleting everything removes the memory image and the snapshots in images.
    assert_eq!(
        bench.ok(&["snapshot-delete", "cli", "s1", "--children"]),
        "Domain snapshot s1 deleted\n\n"
    );
    assert_eq!(bench.ok(&["snapshot-list", "cli", "--name"]).trim(), "");
    assert!(!memory.exists(), "memory image left behind");
    assert!(
        lab::qemu_img(&["snapshot", "-U", "-l", vda.to_str().unwrap()])
            .trim()
            .is_empty()
    );
    assert_eq!(guest.ram_value().unwrap(), "second");
}
