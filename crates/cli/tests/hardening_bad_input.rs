//! Bad input to the snapshot commands (issue 4 "Bad input", DESIGN §5.5):
//! unknown domain or snapshot, a duplicate name, an internal snapshot of a
//! raw disk, a memspec path that exists, a deleted overlay or memory file
//! behind a snapshot. Each gets a one-line reason and a non-zero exit, and
//! changes nothing: the VM runs on as before, no snapshot is recorded, the
//! domain's disks stay where they were, and no file appears anywhere.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs;

use hardening::{qemu_img_check, DiskDef, Lab, Violations};
use vmsnap_testguest::Guest;

/// Everything a refusal must leave untouched.
#[derive(Debug, PartialEq, Eq)]
struct World {
    snapshots: Vec<String>,
    current: String,
    sources: std::collections::BTreeMap<String, String>,
    state_files: std::collections::BTreeMap<std::path::PathBuf, String>,
    lab_files: Vec<std::path::PathBuf>,
    domain_state: String,
}

fn world(lab: &Lab) -> World {
    World {
        snapshots: lab.snapshot_names("bad"),
        current: String::from_utf8_lossy(&lab.run(&["snapshot-current", "bad", "--name"]).stdout)
            .trim()
            .to_string(),
        sources: lab.disk_sources("bad"),
        state_files: lab.state_files(),
        lab_files: lab.lab_files(),
        domain_state: lab.domain_state("bad"),
    }
}

/// Runs a command that must be refused and checks nothing changed;
/// `expect` is a word the reason must contain. Records violations instead
/// of stopping, so one run lists them all.
fn refused_without_change(
    lab: &Lab,
    guest: &mut Guest,
    args: &[&str],
    expect: &str,
    v: &mut Violations,
) {
    let before = world(lab);
    let ram = guest.ram_value().unwrap();
    let counter = guest.counter().unwrap();
    let out = lab.run(args);
    match std::panic::catch_unwind(|| hardening::refusal(args, &out)) {
        Ok(line) => v.check(
            line.contains(expect),
            format!("vmsnap {args:?}: reason should mention {expect:?}: {line}"),
        ),
        Err(_) => v.record(format!(
            "vmsnap {args:?}: not a clean refusal (exit {:?}, stderr {:?})",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
    let after = world(lab);
    v.check(
        after == before,
        format!("vmsnap {args:?} changed things:\n    before {before:?}\n    after  {after:?}"),
    );
    match (guest.ram_value(), guest.counter()) {
        (Ok(value), Ok(now)) => {
            v.check(
                value == ram,
                format!("{args:?}: RAM value {value:?}, was {ram:?}"),
            );
            v.check(
                now > counter,
                format!("{args:?}: guest counter did not advance"),
            );
        }
        (r, c) => v.record(format!("{args:?}: guest no longer answers: {r:?} {c:?}")),
    }
}

#[test]
fn bad_snapshot_requests_are_refused_and_change_nothing() {
    let lab = Lab::new("badinput");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.qemu_img_create(&["-f", "raw", "vdb.raw", "16M"]);
    lab.define(
        "bad",
        &[
            DiskDef {
                target: "vda",
                file: "vda.qcow2",
                format: "qcow2",
            },
            DiskDef {
                target: "vdb",
                file: "vdb.raw",
                format: "raw",
            },
        ],
    );
    let mut guest = lab.start_guest("bad");
    let mut v = Violations::default();
    guest.set_ram_value("raw-vdb").unwrap();
    // While vdb is raw (before any external snapshot puts a qcow2 overlay
    // on it), an internal snapshot, the default, cannot include it.
    let raw_cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["snapshot-create-as", "bad", "int1"], "vdb"),
        (
            vec![
                "snapshot-create-as",
                "bad",
                "int2",
                "--disk-only",
                "--diskspec",
                "vdb,snapshot=internal",
            ],
            "vdb",
        ),
    ];
    for (args, expect) in &raw_cases {
        refused_without_change(&lab, &mut guest, args, expect, &mut v);
    }
    guest.set_ram_value("at-e1").unwrap();
    guest.write_pattern("vda", 0, 256 << 10, 1).unwrap();
    let e1_disk = guest.disk_checksum("vda", 0, 256 << 10).unwrap();
    // Two good snapshots to break later: e1 (memory file and overlays of
    // our choosing), e2 (on top of e1, so e1's overlays are frozen under it).
    lab.ok(&[
        "snapshot-create-as",
        "bad",
        "e1",
        "--memspec",
        "file=e1.mem",
        "--diskspec",
        "vda,file=e1-vda.qcow2",
        "--diskspec",
        "vdb,file=e1-vdb.qcow2",
    ]);
    guest.set_ram_value("at-e2").unwrap();
    lab.ok(&[
        "snapshot-create-as",
        "bad",
        "e2",
        "--memspec",
        "file=e2.mem",
        "--diskspec",
        "vda,file=e2-vda.qcow2",
        "--diskspec",
        "vdb,file=e2-vdb.qcow2",
    ]);
    guest.set_ram_value("running-on").unwrap();
    fs::write(lab.path("taken.mem"), b"someone else's file\n").unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["snapshot-create-as", "nosuch", "x1"], "nosuch"),
        (vec!["snapshot-list", "nosuch"], "nosuch"),
        (vec!["snapshot-info", "nosuch", "e1"], "nosuch"),
        (vec!["snapshot-revert", "nosuch", "e1"], "nosuch"),
        (vec!["snapshot-delete", "nosuch", "e1"], "nosuch"),
        (vec!["snapshot-info", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-dumpxml", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-revert", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-delete", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-parent", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-current", "bad", "nosnap"], "nosnap"),
        (vec!["snapshot-create-as", "bad", "e1", "--external"], "e1"),
        (
            vec![
                "snapshot-create-as",
                "bad",
                "e1",
                "--memspec",
                "file=dup.mem",
                "--diskspec",
                "vda,file=dup-vda.qcow2",
                "--diskspec",
                "vdb,file=dup-vdb.qcow2",
            ],
            "e1",
        ),
        // A memspec path that exists is never overwritten.
        (
            vec![
                "snapshot-create-as",
                "bad",
                "m1",
                "--memspec",
                "file=taken.mem",
                "--diskspec",
                "vda,file=m1-vda.qcow2",
                "--diskspec",
                "vdb,file=m1-vdb.qcow2",
            ],
            "taken.mem",
        ),
        // An overlay path that exists (the live image itself, even).
        (
            vec![
                "snapshot-create-as",
                "bad",
                "o1",
                "--disk-only",
                "--diskspec",
                "vda,file=e2-vda.qcow2",
                "--diskspec",
                "vdb,file=o1-vdb.qcow2",
            ],
            "e2-vda.qcow2",
        ),
    ];
    for (args, expect) in &cases {
        refused_without_change(&lab, &mut guest, args, expect, &mut v);
    }
    v.check(
        fs::read(lab.path("taken.mem")).unwrap() == b"someone else's file\n",
        "the existing memspec file was modified",
    );

    // Files behind snapshots go missing: e2's memory image; e2's frozen
    // image (e1-vda.qcow2, e1's overlay); e1's frozen image (vda.qcow2).
    fs::remove_file(lab.path("e2.mem")).unwrap();
    refused_without_change(
        &lab,
        &mut guest,
        &["snapshot-revert", "bad", "e2"],
        "e2.mem",
        &mut v,
    );
    let moved = lab.path("e1-vda.qcow2.away");
    fs::rename(lab.path("e1-vda.qcow2"), &moved).unwrap();
    // e1-vda.qcow2 is the backing file of the running overlay: QEMU keeps it
    // open, so the guest is unaffected; a revert to e2 needs it by name.
    refused_without_change(
        &lab,
        &mut guest,
        &["snapshot-revert", "bad", "e2"],
        "e2",
        &mut v,
    );
    fs::rename(&moved, lab.path("e1-vda.qcow2")).unwrap();
    fs::rename(lab.path("vda.qcow2"), lab.path("vda.qcow2.away")).unwrap();
    refused_without_change(
        &lab,
        &mut guest,
        &["snapshot-revert", "bad", "e1"],
        "vda.qcow2",
        &mut v,
    );
    fs::rename(lab.path("vda.qcow2.away"), lab.path("vda.qcow2")).unwrap();

    for image in [
        "vda.qcow2",
        "e1-vda.qcow2",
        "e2-vda.qcow2",
        "e1-vdb.qcow2",
        "e2-vdb.qcow2",
    ] {
        if let Err(e) = qemu_img_check(&lab.path(image)) {
            v.record(e);
        }
    }
    v.assert_none("bad input");

    // e1 is intact and still reverts exactly after all that.
    lab.ok(&["snapshot-revert", "bad", "e1"]);
    let mut guest = lab.connect("bad");
    assert_eq!(guest.ram_value().unwrap(), "at-e1");
    assert_eq!(guest.disk_checksum("vda", 0, 256 << 10).unwrap(), e1_disk);
}
