//! Crash safety by the clock (DESIGN §5.4, issue 5 "Prove it"): vmsnap is
//! SIGKILLed at a sweep of moments into an external snapshot's create, its
//! delete and a revert, and QEMU is SIGKILLed in the middle of a create.
//! After each kill the next commands must find every completed snapshot
//! still reverting exactly (guest RAM value and disk checksum), the
//! interrupted one either fully there or not there at all, every image
//! passing `qemu-img check`, the guest running as before, and (after
//! `snapshot-recover`) no orphaned file in the state directory.
//!
//! The snapshot code has no named failpoints yet, so moments are times;
//! the sweep is dense enough to land in every step of a ~0.3 s operation.

#[path = "common/hardening.rs"]
mod hardening;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hardening::{qemu_img_check, DiskDef, Lab, Violations};
use vmsnap_testguest::Guest;

const DOMAIN: &str = "crash";

/// The guest state a snapshot must bring back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    ram: String,
    disk: String,
}

fn mark(guest: &mut Guest, tag: &str, seed: u64) -> Mark {
    guest.set_ram_value(tag).unwrap();
    guest
        .write_pattern("vda", 2 << 20, 128 << 10, seed)
        .unwrap();
    Mark {
        ram: tag.to_string(),
        disk: guest.disk_checksum("vda", 2 << 20, 128 << 10).unwrap(),
    }
}

/// Runs vmsnap `args` and SIGKILLs it after `delay` (if still running).
/// Returns whether it had already finished, and its exit status if so.
fn kill_after(lab: &Lab, args: &[&str], delay: Duration) -> Option<bool> {
    let mut child = lab
        .bare_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmsnap");
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().map(|s| s.success());
    if finished.is_none() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    finished.or(if status.success() { Some(true) } else { None })
}

/// Every qcow2 file under `dir`.
fn qcow2_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "qcow2") {
                found.push(p);
            }
        }
    }
    found
}

/// The files a snapshot or the live state still needs: every memory image
/// and disk source named in the snapshots' XML, the active images, and
/// their whole backing chains.
fn referenced_files(lab: &Lab) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    let mut images = Vec::new();
    for name in lab.snapshot_names(DOMAIN) {
        let xml = lab.ok(&["snapshot-dumpxml", DOMAIN, &name]);
        for piece in xml.split("file='").skip(1) {
            let path = PathBuf::from(piece.split('\'').next().unwrap());
            if path.extension().is_some_and(|e| e == "qcow2") {
                images.push(path.clone());
            }
            files.insert(path);
        }
    }
    images.extend(lab.disk_sources(DOMAIN).into_values().map(PathBuf::from));
    for image in images {
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--backing-chain", "--output=json"])
            .arg(&image)
            .output()
            .unwrap();
        if let Ok(chain) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            for layer in chain.as_array().into_iter().flatten() {
                if let Some(f) = layer["filename"].as_str() {
                    files.insert(PathBuf::from(f));
                }
            }
        }
        files.insert(image);
    }
    files
        .into_iter()
        .map(|f| std::fs::canonicalize(&f).unwrap_or(f))
        .collect()
}

struct Checker<'a> {
    lab: &'a Lab,
    /// Completed snapshots and what each must bring back.
    completed: BTreeMap<String, Mark>,
    v: Violations,
}

impl Checker<'_> {
    /// After a kill: the next commands work; `name` is all there or not at
    /// all; images check clean; the guest runs; nothing is orphaned.
    fn after_kill(&mut self, what: &str, name: Option<(&str, Mark)>) {
        let listed = match self.lab.run(&["snapshot-list", DOMAIN, "--name"]) {
            out if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<BTreeSet<_>>(),
            out => {
                self.v.record(format!(
                    "{what}: snapshot-list failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
                return;
            }
        };
        let recover = self.lab.run(&["snapshot-recover", DOMAIN]);
        if !recover.status.success() {
            self.v.record(format!(
                "{what}: snapshot-recover failed: {}",
                String::from_utf8_lossy(&recover.stderr)
            ));
        }
        if let Some((name, mut mark)) = name {
            if listed.contains(name) {
                // A QEMU that died before vmsnap looked makes this a snapshot
                // of a stopped domain: disks only, and a revert boots afresh.
                let xml = self.lab.ok(&["snapshot-dumpxml", DOMAIN, name]);
                if xml.contains("<memory snapshot='no'/>") {
                    mark.ram = String::new();
                }
                self.completed.insert(name.to_string(), mark);
            }
        }
        for name in self.completed.keys() {
            self.v.check(
                listed.contains(name),
                format!("{what}: completed snapshot {name} lost (list: {listed:?})"),
            );
        }
        for image in qcow2_files(&self.lab.state()) {
            if let Err(e) = qemu_img_check(&image) {
                self.v.record(format!("{what}: {e}"));
            }
        }
        let referenced = referenced_files(self.lab);
        let snapshot_dir = self
            .lab
            .state()
            .join("domains")
            .join(DOMAIN)
            .join("snapshots");
        for entry in std::fs::read_dir(&snapshot_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = std::fs::canonicalize(entry.path()).unwrap();
            self.v.check(
                referenced.contains(&path),
                format!("{what}: orphan {} after snapshot-recover", path.display()),
            );
        }
    }

    /// Reverts to `name` and checks the guest holds what it held then.
    /// `old`, the connection to the guest so far, is closed first: the
    /// guest's control channel takes one client at a time.
    fn reverts_exactly(&mut self, what: &str, name: &str, old: Option<Guest>) -> Option<Guest> {
        drop(old);
        let expected = self.completed[name].clone();
        let out = self
            .lab
            .run(&["snapshot-revert", DOMAIN, name, "--running"]);
        if !out.status.success() {
            self.v.record(format!(
                "{what}: revert to {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            return None;
        }
        let mut guest =
            match Guest::connect(self.lab.control_socket(DOMAIN), Duration::from_secs(60)) {
                Ok(guest) => guest,
                Err(e) => {
                    self.v
                        .record(format!("{what}: guest gone after revert to {name}: {e}"));
                    return None;
                }
            };
        let got = Mark {
            ram: guest.ram_value().unwrap_or_default(),
            disk: guest
                .disk_checksum("vda", 2 << 20, 128 << 10)
                .unwrap_or_default(),
        };
        self.v.check(
            got == expected,
            format!("{what}: revert to {name} gave {got:?}, expected {expected:?}"),
        );
        Some(guest)
    }

    /// The guest answers and its counter moves: it runs as before.
    fn guest_runs(&mut self, what: &str, old: Guest) -> Option<Guest> {
        drop(old);
        match Guest::connect(self.lab.control_socket(DOMAIN), Duration::from_secs(20)) {
            Ok(mut guest) => {
                let a = guest.counter().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(200));
                let b = guest.counter().unwrap_or(0);
                self.v
                    .check(b > a, format!("{what}: guest counter stuck at {a}"));
                Some(guest)
            }
            Err(e) => {
                self.v.record(format!("{what}: guest does not answer: {e}"));
                None
            }
        }
    }
}

#[test]
fn sigkill_at_any_moment_of_external_create_delete_and_revert_loses_nothing() {
    sweep(
        "crash-ext",
        &["--external"],
        &[5, 40, 90, 150, 220, 320, 500, 800],
    );
}

#[test]
fn sigkill_at_any_moment_of_internal_create_delete_and_revert_loses_nothing() {
    // Internal with memory: QEMU's snapshot-save/-load/-delete jobs go on
    // after vmsnap dies; recovery must settle what they leave.
    sweep("crash-int", &[], &[20, 70, 140, 250, 400]);
}

/// Kills vmsnap at each of `delays_ms` into a create (with `kind` flags),
/// a delete of a fresh leaf, and a revert, checking after each.
fn sweep(prefix: &str, kind: &[&str], delays_ms: &[u64]) {
    let lab = Lab::new(prefix);
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        DOMAIN,
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    let mut guest = lab.start_guest(DOMAIN);
    let base = mark(&mut guest, "base", 1);
    let with_kind =
        |args: &[&str]| -> Vec<String> { args.iter().chain(kind).map(|a| a.to_string()).collect() };
    let base_args = with_kind(&["snapshot-create-as", DOMAIN, "base"]);
    lab.ok(&base_args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut check = Checker {
        lab: &lab,
        completed: BTreeMap::from([("base".to_string(), base)]),
        v: Violations::default(),
    };

    for (i, ms) in delays_ms.iter().enumerate() {
        let delay = Duration::from_millis(*ms);

        // vmsnap killed during an external create (memory + disk).
        let name = format!("c{i}");
        let what = format!("create {name} killed at {ms} ms");
        let m = mark(&mut guest, &name, 10 + i as u64);
        let create = with_kind(&["snapshot-create-as", DOMAIN, &name]);
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        let done = kill_after(&lab, &create, delay);
        check.after_kill(&what, Some((&name, m)));
        eprintln!(
            "{what}: {}, snapshot {}",
            if done.is_some() {
                "had finished"
            } else {
                "killed"
            },
            if check.completed.contains_key(&name) {
                "kept"
            } else {
                "absent"
            }
        );
        guest = match check.guest_runs(&what, guest) {
            Some(g) => g,
            None => {
                return check
                    .v
                    .assert_none(&format!("SIGKILL of vmsnap ({prefix})"))
            }
        };

        // vmsnap killed during the delete of a fresh leaf (the current snapshot).
        let leaf = format!("d{i}");
        let m = mark(&mut guest, &leaf, 100 + i as u64);
        let create = with_kind(&["snapshot-create-as", DOMAIN, &leaf]);
        lab.ok(&create.iter().map(String::as_str).collect::<Vec<_>>());
        check.completed.insert(leaf.clone(), m);
        let what = format!("delete {leaf} killed at {ms} ms");
        let done = kill_after(&lab, &["snapshot-delete", DOMAIN, &leaf], delay);
        let listed = lab.snapshot_names(DOMAIN);
        if !listed.contains(&leaf) {
            check.completed.remove(&leaf);
        } else if done == Some(true) {
            check.v.record(format!(
                "{what}: delete reported success but {leaf} is listed"
            ));
        }
        eprintln!(
            "{what}: {}, snapshot {}",
            if done.is_some() {
                "had finished"
            } else {
                "killed"
            },
            if check.completed.contains_key(&leaf) {
                "kept"
            } else {
                "gone"
            }
        );
        check.after_kill(&what, None);
        guest = match check.guest_runs(&what, guest) {
            Some(g) => g,
            None => {
                return check
                    .v
                    .assert_none(&format!("SIGKILL of vmsnap ({prefix})"))
            }
        };

        // vmsnap killed during a revert to base: afterwards the domain is
        // usable, and base (and every other) still reverts exactly.
        let what = format!("revert to base killed at {ms} ms");
        mark(&mut guest, "before-revert", 1000 + i as u64);
        let done = kill_after(&lab, &["snapshot-revert", DOMAIN, "base"], delay);
        eprintln!(
            "{what}: {}",
            if done.is_some() {
                "had finished"
            } else {
                "killed"
            }
        );
        check.after_kill(&what, None);
        // Done (running at base) or not done (running on as before): the
        // guest runs either way, never left paused half-way.
        let state = lab.domain_state(DOMAIN);
        check.v.check(
            state == "running",
            format!("{what}: domain left {state:?} after recovery"),
        );
        let target = if i % 2 == 0 {
            "base".to_string()
        } else {
            name.clone()
        };
        let target = if check.completed.contains_key(&target) {
            target
        } else {
            "base".into()
        };
        guest = match check.reverts_exactly(&what, &target, Some(guest)) {
            Some(g) => g,
            None => {
                return check
                    .v
                    .assert_none(&format!("SIGKILL of vmsnap ({prefix})"))
            }
        };
    }
    // Every snapshot that survived still reverts exactly. The guest's
    // control channel takes one client at a time and an internal revert
    // keeps the same QEMU (and channel), so close ours first.
    drop(guest);
    let names: Vec<String> = check.completed.keys().cloned().collect();
    for name in names {
        if check.reverts_exactly("final sweep", &name, None).is_none() {
            break;
        }
    }
    check
        .v
        .assert_none(&format!("SIGKILL of vmsnap ({prefix})"));
}

#[test]
fn sigkill_of_qemu_during_a_snapshot_loses_no_completed_snapshot() {
    let lab = Lab::new("crashqemu");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        DOMAIN,
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    let mut guest = lab.start_guest(DOMAIN);
    let base = mark(&mut guest, "base", 1);
    lab.ok(&["snapshot-create-as", DOMAIN, "base", "--external"]);
    let mut check = Checker {
        lab: &lab,
        completed: BTreeMap::from([("base".to_string(), base)]),
        v: Violations::default(),
    };
    for (i, ms) in [30u64, 120, 250].iter().enumerate() {
        let name = format!("q{i}");
        let what = format!("QEMU killed {ms} ms into create {name}");
        let m = mark(&mut guest, &name, 50 + i as u64);
        let pid = lab.qemu_pid(DOMAIN).expect("QEMU runs");
        let child = lab
            .command(&["snapshot-create-as", DOMAIN, &name, "--external"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            check.v.check(
                stderr.lines().count() == 1,
                format!("{what}: not a one-line error: {stderr:?}"),
            );
        }
        check.after_kill(&what, Some((&name, m)));
        eprintln!(
            "{what}: vmsnap {}, snapshot {}",
            if out.status.success() {
                "succeeded"
            } else {
                "failed"
            },
            if check.completed.contains_key(&name) {
                lab.ok(&["snapshot-dumpxml", DOMAIN, &name])
                    .lines()
                    .filter(|l| l.contains("<state>") || l.contains("<memory"))
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                "absent".to_string()
            }
        );
        let state = lab.domain_state(DOMAIN);
        check.v.check(
            state == "crashed" || state == "shut off",
            format!("{what}: domain is {state:?}"),
        );
        // Reverting to base starts a new QEMU from the frozen images.
        guest = match check.reverts_exactly(&what, "base", Some(guest)) {
            Some(g) => g,
            None => break,
        };
    }
    let names: Vec<String> = check.completed.keys().cloned().collect();
    for name in names {
        if check.reverts_exactly("final sweep", &name, None).is_none() {
            break;
        }
    }
    check.v.assert_none("SIGKILL of QEMU");
}
