//! Crash safety at every write (DESIGN §5.4): the stopped-domain snapshot
//! paths (internal snapshots through vmsnap's own qcow2 engine, metadata in
//! the SQLite store) are SIGKILLed at the Nth write-like system call, for
//! every N the operation makes (every other N for revert), using strace's
//! fault injection. After each kill, and the next vmsnap commands: the
//! interrupted snapshot is all there (metadata, qcow2 tag and data) or not
//! at all, the image passes `qemu-img check` with no corruption (leaks
//! allowed), the active data is what it was (or, for a revert, exactly the
//! snapshot's), and the snapshot taken before is intact.

#[path = "common/hardening.rs"]
mod hardening;

use std::collections::BTreeSet;
use std::process::Command;

use hardening::{DiskDef, Lab, Violations};

/// The system calls that change files: a kill at any of them is a kill
/// between two steps that persist something.
const WRITES: &str = "pwrite64,pwritev,pwritev2,write,fsync,fdatasync,ftruncate,fallocate,\
                      unlink,unlinkat,rename,renameat,renameat2";

const DOMAIN: &str = "eng";

struct Bench {
    lab: Lab,
    keep_hash: String,
    v: Violations,
}

impl Bench {
    fn image(&self) -> std::path::PathBuf {
        self.lab.path("vda.qcow2")
    }

    fn strace(&self, args: &[&str], inject_at: Option<usize>) -> (bool, String) {
        let log = self.lab.path("writes.log");
        let mut command = Command::new("strace");
        command.args(["-f", "-qq", "-e", &format!("trace={WRITES}"), "-o"]);
        command.arg(&log);
        if let Some(n) = inject_at {
            command.args(["-e", &format!("inject={WRITES}:signal=KILL:when={n}")]);
        }
        let out = command
            .arg(env!("CARGO_BIN_EXE_vmsnap"))
            .arg("--state-dir")
            .arg(self.lab.state())
            .args(args)
            .output()
            .expect("strace is installed (apt-get install strace)");
        (
            out.status.success(),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    /// How many write-like calls `args` makes (it runs for real).
    fn count_writes(&self, args: &[&str]) -> usize {
        let (ok, log) = self.strace(args, None);
        assert!(ok, "vmsnap {args:?} failed under strace");
        log.lines()
            .filter(|l| !l.contains("+++") && !l.contains("---"))
            .count()
    }

    /// Runs `args`, SIGKILLed at its `n`th write; true if it finished first.
    fn killed_at(&self, args: &[&str], n: usize) -> bool {
        self.strace(args, Some(n)).0
    }

    fn scribble(&self, seed: usize) {
        let offset = (seed * 3 % 60) * 64 * 1024;
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {} {offset} 64k", seed % 250 + 1))
            .arg(self.image())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// sha256 of the active data, or of internal snapshot `tag`.
    fn hash(&self, tag: Option<&str>) -> Result<String, String> {
        let raw = self.lab.path("out.raw");
        let mut command = Command::new("qemu-img");
        command.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]);
        if let Some(tag) = tag {
            command.args(["-l", &format!("snapshot.name={tag}")]);
        }
        let out = command.arg(self.image()).arg(&raw).output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let sum = Command::new("sha256sum").arg(&raw).output().unwrap();
        Ok(String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    fn tags(&self) -> BTreeSet<String> {
        let out = Command::new("qemu-img")
            .args(["snapshot", "-U", "-l"])
            .arg(self.image())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .collect()
    }

    /// The checks every kill must pass; returns whether `name` survived.
    fn after_kill(&mut self, what: &str, name: &str, active: &[&str]) -> bool {
        for args in [
            vec!["snapshot-list", DOMAIN, "--name"],
            vec!["snapshot-recover", DOMAIN],
        ] {
            let out = self.lab.run(&args);
            if !out.status.success() {
                self.v.record(format!(
                    "{what}: {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return false;
            }
        }
        let listed: BTreeSet<String> = self.lab.snapshot_names(DOMAIN).into_iter().collect();
        let tags = self.tags();
        let present = listed.contains(name);
        self.v.check(
            present == tags.contains(name),
            format!("{what}: metadata {listed:?} and image tags {tags:?} disagree about {name}"),
        );
        self.v.check(
            listed.contains("keep") && tags.contains("keep"),
            format!("{what}: the earlier snapshot 'keep' was lost ({listed:?}, {tags:?})"),
        );
        let check = Command::new("qemu-img")
            .args(["check", "-U", "-f", "qcow2", "--output=json"])
            .arg(self.image())
            .output()
            .unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&check.stdout).unwrap_or(serde_json::Value::Null);
        // qemu-img omits "corruptions" when there are none.
        if report["corruptions"].as_u64().unwrap_or(0) != 0
            || report["check-errors"].as_u64() != Some(0)
        {
            let human = Command::new("qemu-img")
                .args(["check", "-U", "-f", "qcow2"])
                .arg(self.image())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&human.stderr).to_string()
                + &String::from_utf8_lossy(&human.stdout);
            let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
            self.v.record(format!(
                "{what}: qemu-img check finds {} corruption(s), e.g. {:?}",
                report["corruptions"],
                &errors[..errors.len().min(2)]
            ));
        }
        match self.hash(None) {
            Ok(h) => self.v.check(
                active.contains(&h.as_str()),
                format!("{what}: active data is neither of the expected states"),
            ),
            Err(e) => self
                .v
                .record(format!("{what}: active data unreadable: {e}")),
        }
        match self.hash(Some("keep")) {
            Ok(h) => self
                .v
                .check(h == self.keep_hash, format!("{what}: 'keep' data changed")),
            Err(e) => self.v.record(format!("{what}: 'keep' unreadable: {e}")),
        }
        present
    }
}

#[test]
fn offline_snapshot_operations_killed_at_every_write_stay_consistent() {
    let lab = Lab::new("engcrash");
    lab.qemu_img_create(&["-f", "qcow2", "-o", "cluster_size=4096", "vda.qcow2", "4M"]);
    lab.define(
        DOMAIN,
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    let mut bench = Bench {
        lab,
        keep_hash: String::new(),
        v: Violations::default(),
    };
    for seed in 0..60 {
        bench.scribble(seed);
    }
    bench.lab.ok(&["snapshot-create-as", DOMAIN, "keep"]);
    bench.keep_hash = bench.hash(Some("keep")).unwrap();

    // Create, killed at each of its writes.
    let creates = bench.count_writes(&["snapshot-create-as", DOMAIN, "probe"]);
    bench.count_writes(&["snapshot-delete", DOMAIN, "probe"]);
    let mut kept = 0;
    for n in 1..=creates {
        bench.scribble(100 + n);
        let before = bench.hash(None).unwrap();
        let name = format!("c{n}");
        let finished = bench.killed_at(&["snapshot-create-as", DOMAIN, &name], n);
        let what = format!("create killed at write {n}/{creates}");
        let present = bench.after_kill(&what, &name, &[&before]);
        bench.v.check(
            !finished || present,
            format!("{what}: finished but {name} missing"),
        );
        if present {
            kept += 1;
            match bench.hash(Some(&name)) {
                Ok(h) => bench
                    .v
                    .check(h == before, format!("{what}: {name} holds the wrong data")),
                Err(e) => bench.v.record(format!("{what}: {name} unreadable: {e}")),
            }
            bench.lab.ok(&["snapshot-delete", DOMAIN, &name]);
        }
    }
    eprintln!("create: {creates} writes, {kept} kills after the commit point");

    // Delete of a leaf, killed at each of its writes.
    bench.scribble(7);
    bench.lab.ok(&["snapshot-create-as", DOMAIN, "probe"]);
    let deletes = bench.count_writes(&["snapshot-delete", DOMAIN, "probe"]);
    let mut gone = 0;
    for n in 1..=deletes {
        bench.scribble(200 + n);
        let before = bench.hash(None).unwrap();
        let name = format!("d{n}");
        bench.lab.ok(&["snapshot-create-as", DOMAIN, &name]);
        let finished = bench.killed_at(&["snapshot-delete", DOMAIN, &name], n);
        let what = format!("delete killed at write {n}/{deletes}");
        let present = bench.after_kill(&what, &name, &[&before]);
        bench.v.check(
            !finished || !present,
            format!("{what}: finished but {name} listed"),
        );
        if present {
            match bench.hash(Some(&name)) {
                Ok(h) => bench
                    .v
                    .check(h == before, format!("{what}: {name} holds the wrong data")),
                Err(e) => bench.v.record(format!("{what}: {name} unreadable: {e}")),
            }
            bench.lab.ok(&["snapshot-delete", DOMAIN, &name]);
        } else {
            gone += 1;
        }
    }
    eprintln!("delete: {deletes} writes, {gone} kills after the commit point");

    // Revert to 'keep', killed at each of its writes: the active data is
    // the old state or exactly 'keep', never a mix.
    bench.scribble(9);
    let reverts = bench.count_writes(&["snapshot-revert", DOMAIN, "keep"]);
    // Every other write: the revert path has passed at every single one so
    // far, and the suite must stay within its time budget.
    for n in (1..=reverts).step_by(2) {
        bench.scribble(300 + n);
        let before = bench.hash(None).unwrap();
        let finished = bench.killed_at(&["snapshot-revert", DOMAIN, "keep"], n);
        let what = format!("revert killed at write {n}/{reverts}");
        let keep = bench.keep_hash.clone();
        bench.after_kill(&what, "keep", &[&before, &keep]);
        if finished {
            bench.v.check(
                bench.hash(None).ok().as_deref() == Some(keep.as_str()),
                format!("{what}: finished but the data is not 'keep'"),
            );
        }
    }
    eprintln!("revert: {reverts} writes");
    bench
        .v
        .assert_none("offline operations killed at every write");
}
