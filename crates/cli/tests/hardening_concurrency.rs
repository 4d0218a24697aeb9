//! Two operators at once (DESIGN §5.5, issue 5 "Concurrency"): two
//! `snapshot-create-as` on one running domain never interleave (the second
//! refuses with a one-line "busy" error, or waits with --wait), and
//! snapshots of four running domains taken in parallel all succeed and all
//! revert exactly.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use hardening::{eventually, qemu_img_check, refusal, DiskDef, Lab};

/// Whether some process holds an flock(2) on the file with inode `ino`,
/// read from /proc/locks so the probe itself never takes the lock.
fn flock_held(ino: u64) -> bool {
    fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(1) == Some(&"FLOCK")
                && fields
                    .get(5)
                    .and_then(|dev_ino| dev_ino.rsplit(':').next())
                    .and_then(|i| i.parse::<u64>().ok())
                    == Some(ino)
        })
}

fn spawn(lab: &Lab, args: &[&str]) -> Child {
    lab.command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmsnap")
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("wait vmsnap")
}

/// What the guest holds at a snapshot: its RAM value and a disk checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestState {
    ram: String,
    disk: String,
}

fn mark(guest: &mut vmsnap_testguest::Guest, tag: &str, seed: u64) -> GuestState {
    guest.set_ram_value(tag).unwrap();
    guest
        .write_pattern("vda", 1 << 20, 256 << 10, seed)
        .unwrap();
    GuestState {
        ram: tag.to_string(),
        disk: guest.disk_checksum("vda", 1 << 20, 256 << 10).unwrap(),
    }
}

fn observe(guest: &mut vmsnap_testguest::Guest) -> GuestState {
    GuestState {
        ram: guest.ram_value().unwrap(),
        disk: guest.disk_checksum("vda", 1 << 20, 256 << 10).unwrap(),
    }
}

fn one_domain(lab: &Lab, name: &str) {
    let image = format!("{name}.qcow2");
    lab.qemu_img_create(&["-f", "qcow2", &image, "64M"]);
    lab.define(
        name,
        &[DiskDef {
            target: "vda",
            file: &image,
            format: "qcow2",
        }],
    );
}

#[test]
fn two_snapshot_commands_on_one_domain_never_interleave() {
    let lab = Lab::new("conc-one");
    one_domain(&lab, "shared");
    let mut guest = lab.start_guest("shared");
    let lock_ino = fs::metadata(lab.state().join("domains/shared/lock"))
        .expect("the domain's lock file")
        .ino();
    let mut expected: Vec<(String, GuestState)> = Vec::new();

    // A takes the lock; B, started while A holds it, refuses at once.
    let mut seen_busy = false;
    for attempt in 0..5 {
        let a_name = format!("a{attempt}");
        let b_name = format!("b{attempt}");
        let state = mark(&mut guest, &a_name, 100 + attempt);
        let a = spawn(
            &lab,
            &[
                "snapshot-create-as",
                "shared",
                &a_name,
                "--memspec",
                &format!("file={a_name}.mem,snapshot=external"),
                "--diskspec",
                &format!("vda,snapshot=external,file={a_name}.qcow2"),
            ],
        );
        let held = eventually(Duration::from_secs(10), || flock_held(lock_ino));
        let b_args = ["snapshot-create-as", "shared", b_name.as_str()];
        let started = Instant::now();
        let b = finish(spawn(&lab, &b_args));
        let b_took = started.elapsed();
        if flock_held(lock_ino) {
            // A domain command is refused the same way; a read-only one
            // answers at once without waiting for A.
            let suspend = lab.run(&["suspend", "shared"]);
            if suspend.status.success() {
                // A had just let go: undo and carry on.
                lab.ok(&["resume", "shared"]);
            } else {
                let line = refusal(&["suspend", "shared"], &suspend);
                assert!(line.contains("busy"), "suspend during A: {line}");
            }
            let listed_at = Instant::now();
            lab.ok(&["snapshot-list", "shared", "--name"]);
            assert!(
                listed_at.elapsed() < Duration::from_secs(3),
                "snapshot-list waited for the lock holder ({:?})",
                listed_at.elapsed()
            );
        }
        let a_out = finish(a);
        assert!(
            a_out.status.success(),
            "A failed: {}",
            String::from_utf8_lossy(&a_out.stderr)
        );
        expected.push((a_name.clone(), state.clone()));
        if b.status.success() {
            // B only ran after A had let go (A was too quick to catch);
            // then B's snapshot is a real one and must revert too.
            assert!(!held, "B succeeded while A held the domain lock");
            expected.push((b_name, state));
            continue;
        }
        let line = refusal(&b_args, &b);
        assert!(
            line.contains("busy"),
            "B must say the domain is busy: {line}"
        );
        assert!(
            b_took < Duration::from_secs(5),
            "busy must fail at once, took {b_took:?}"
        );
        seen_busy = true;
        break;
    }
    assert!(seen_busy, "never caught A holding the lock in 5 attempts");

    // With --wait, C and D both run, one after the other.
    let c_state = mark(&mut guest, "c", 300);
    let c = spawn(&lab, &["snapshot-create-as", "shared", "c"]);
    assert!(eventually(Duration::from_secs(10), || flock_held(lock_ino)));
    let d = spawn(&lab, &["--wait", "snapshot-create-as", "shared", "d"]);
    let (c, d) = (finish(c), finish(d));
    assert!(
        c.status.success(),
        "C: {}",
        String::from_utf8_lossy(&c.stderr)
    );
    assert!(
        d.status.success(),
        "D: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    expected.push(("c".into(), c_state.clone()));
    // D ran after C with no guest change between them: same state.
    expected.push(("d".into(), c_state));

    let mut names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        lab.snapshot_names("shared"),
        names,
        "exactly the ones that succeeded"
    );

    // Every snapshot reverts to what the guest held when it was taken.
    mark(&mut guest, "after-all", 999);
    for (name, state) in &expected {
        lab.ok(&["snapshot-revert", "shared", name]);
        let mut guest = lab.connect("shared");
        assert_eq!(&observe(&mut guest), state, "after reverting to {name}");
    }
    for (target, source) in lab.disk_sources("shared") {
        if source.ends_with(".qcow2") {
            qemu_img_check(std::path::Path::new(&source))
                .unwrap_or_else(|e| panic!("{target}: {e}"));
        }
    }
}

#[test]
fn snapshots_of_four_domains_in_parallel_all_succeed() {
    let lab = Lab::new("conc-four");
    let names = ["p1", "p2", "p3", "p4"];
    for name in names {
        one_domain(&lab, name);
    }
    // Start all four at once, and boot them side by side.
    let starts: Vec<Child> = names.iter().map(|n| spawn(&lab, &["start", n])).collect();
    for (name, child) in names.iter().zip(starts) {
        let out = finish(child);
        assert!(
            out.status.success(),
            "start {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut guests: Vec<_> = names.iter().map(|n| lab.connect(n)).collect();

    // Round 1: internal snapshots with memory, all four at once.
    let mut internal = Vec::new();
    for (i, guest) in guests.iter_mut().enumerate() {
        internal.push(mark(guest, &format!("{}-int", names[i]), 10 + i as u64));
    }
    let creates: Vec<Child> = names
        .iter()
        .map(|n| spawn(&lab, &["snapshot-create-as", n, "int"]))
        .collect();
    for (name, child) in names.iter().zip(creates) {
        let out = finish(child);
        assert!(
            out.status.success(),
            "internal snapshot of {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Round 2: external memory + disk snapshots, all four at once.
    let mut external = Vec::new();
    for (i, guest) in guests.iter_mut().enumerate() {
        external.push(mark(guest, &format!("{}-ext", names[i]), 20 + i as u64));
    }
    let creates: Vec<Child> = names
        .iter()
        .map(|n| spawn(&lab, &["snapshot-create-as", n, "ext", "--external"]))
        .collect();
    for (name, child) in names.iter().zip(creates) {
        let out = finish(child);
        assert!(
            out.status.success(),
            "external snapshot of {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in names {
        assert_eq!(lab.snapshot_names(name), ["ext", "int"], "{name}");
    }
    for guest in guests.iter_mut() {
        guest.set_ram_value("later").unwrap();
    }

    // Revert all four in parallel, to each kind in turn.
    for (snapshot, states) in [("int", &internal), ("ext", &external)] {
        let reverts: Vec<Child> = names
            .iter()
            .map(|n| spawn(&lab, &["snapshot-revert", n, snapshot]))
            .collect();
        for (name, child) in names.iter().zip(reverts) {
            let out = finish(child);
            assert!(
                out.status.success(),
                "revert {name} to {snapshot}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (i, name) in names.iter().enumerate() {
            let mut guest = lab.connect(name);
            assert_eq!(
                observe(&mut guest),
                states[i],
                "{name} after revert to {snapshot}"
            );
        }
    }
}
