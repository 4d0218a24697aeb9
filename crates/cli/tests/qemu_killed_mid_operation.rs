//! Crash safety when QEMU, not vmsnap, dies (DESIGN §5.4, issue 5 "Same
//! with SIGKILL to QEMU at the riskiest steps"). hardening_crash.rs kills
//! QEMU during an external create; here QEMU is SIGKILLed in the middle of
//! the other risky operations of a running guest:
//!
//! - (a) `snapshot-revert` to an external memory+disk snapshot: the new
//!   QEMU is killed while it loads the memory image;
//! - (b) `snapshot-delete` of an external snapshot whose frozen image is
//!   streamed live into its child (block-stream of a 40 MiB layer): QEMU is
//!   killed while the stream writes the child;
//! - (c) an internal snapshot with memory (QMP snapshot-save job) and a
//!   revert to one (snapshot-load job): QEMU is killed mid-job.
//!
//! After each kill: vmsnap fails with a one-line error (or succeeded, if the
//! operation finished first, and then it is fully done); `snapshot-list`
//! (which recovers) succeeds; every snapshot completed before is listed and
//! reverts exactly (guest RAM value and disk checksum); the interrupted
//! snapshot is fully there (and reverts exactly) or absent; every qcow2 of
//! the snapshot directory and the configured disk passes `qemu-img check`
//! (leaked clusters allowed); and no file of the snapshot directory is left
//! that no snapshot and no live disk needs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::{pattern_checksum, Guest};

/// The guest disk range every mark writes and every check reads.
const OFFSET: u64 = 2 << 20;
const LEN: u64 = 256 << 10;

/// How long a guest may take to boot or resume under TCG on a loaded machine.
const BOOT: Duration = Duration::from_secs(120);

/// What a snapshot (or the live guest) must read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expect {
    disk: String,
    ram: String,
}

struct Bench {
    cli: VmsnapCli,
    dom: &'static str,
    guest: Option<Guest>,
    completed: BTreeMap<String, Expect>,
    problems: Vec<String>,
    started: Instant,
}

impl Bench {
    fn new(dom: &'static str) -> Bench {
        let cli =
            VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), &format!("vmsnap-qkill-{dom}"));
        cli.guard(dom);
        lab::create_qcow2(&cli.path("vda.qcow2"), "64M");
        let config = cli.write_guest_config(dom, 160, &[DiskDef::qcow2("vda", "vda.qcow2")]);
        cli.ok(&["define", config.to_str().unwrap()]);
        cli.ok(&["start", dom]);
        let mut bench = Bench {
            cli,
            dom,
            guest: None,
            completed: BTreeMap::new(),
            problems: Vec::new(),
            started: Instant::now(),
        };
        assert!(bench.connect("boot"), "the guest does not boot");
        bench
    }

    fn problem(&mut self, message: String) {
        eprintln!("[{}] PROBLEM: {message}", self.dom);
        self.problems.push(message);
    }

    fn log(&self, message: &str) {
        eprintln!(
            "[{}] {:6.1}s {message}",
            self.dom,
            self.started.elapsed().as_secs_f64()
        );
    }

    fn connect(&mut self, what: &str) -> bool {
        self.guest = None;
        match Guest::connect(self.cli.control_socket(), BOOT) {
            Ok(guest) => {
                self.guest = Some(guest);
                true
            }
            Err(e) => {
                self.problem(format!("{what}: guest does not answer: {e}"));
                false
            }
        }
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().expect("guest connected")
    }

    /// Writes a new disk range and RAM value in the guest.
    fn mark(&mut self, seed: u64, ram: &str) -> Expect {
        let guest = self.guest();
        guest.write_pattern("vda", OFFSET, LEN, seed).unwrap();
        guest.set_ram_value(ram).unwrap();
        Expect {
            disk: pattern_checksum(OFFSET, LEN, seed).unwrap(),
            ram: ram.to_string(),
        }
    }

    fn create_ok(&mut self, name: &str, flags: &[&str], seed: u64) {
        let expect = self.mark(seed, name);
        let mut args = vec!["snapshot-create-as", self.dom, name];
        args.extend_from_slice(flags);
        self.cli.ok(&args);
        self.completed.insert(name.to_string(), expect);
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.cli.ok(&all)).unwrap()
    }

    fn snapshots(&self) -> Vec<Value> {
        match self.json(&["snapshot-list", self.dom]) {
            Value::Array(list) => list,
            other => panic!("snapshot-list --json: {other}"),
        }
    }

    fn current(&self) -> Option<String> {
        self.snapshots()
            .into_iter()
            .find(|s| s["current"] == Value::Bool(true))
            .and_then(|s| s["name"].as_str().map(String::from))
    }

    fn domain_state(&self) -> String {
        let list = self.json(&["list", "--all"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == self.dom)
            .and_then(|d| d["state"].as_str())
            .unwrap_or("?")
            .to_string()
    }

    fn qemu_pid(&self) -> Option<u32> {
        lab::qemu_pid(&self.cli.state(), self.dom)
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.cli
            .state()
            .join("domains")
            .join(self.dom)
            .join("snapshots")
    }

    /// Starts vmsnap `args` in the background (stderr captured).
    fn spawn(&mut self, args: &[&str]) -> Child {
        // The guest's control channel takes one client: a revert's new QEMU
        // must find it free.
        self.guest = None;
        self.cli
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmsnap")
    }

    /// Waits for `child`, SIGKILLing QEMU once `trigger` names a pid (it is
    /// polled every 5 ms with the time since the start; `None` = not yet).
    /// Returns whether vmsnap succeeded and whether QEMU was killed before
    /// vmsnap had exited.
    fn kill_qemu_when(
        &mut self,
        what: &str,
        mut child: Child,
        mut trigger: impl FnMut(&Bench, Duration) -> Option<u32>,
    ) -> bool {
        let start = Instant::now();
        let mut killed = None;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if let Some(pid) = trigger(self, start.elapsed()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                killed = Some((pid, start.elapsed()));
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("{what}: vmsnap hung");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        match killed {
            Some((pid, at)) => self.log(&format!(
                "{what}: QEMU {pid} killed at {:.0} ms; vmsnap {:?}: {}",
                at.as_secs_f64() * 1000.0,
                out.status,
                stderr.trim()
            )),
            None => self.log(&format!(
                "{what}: vmsnap finished before the kill ({:?})",
                out.status
            )),
        }
        if killed.is_none() {
            // Too late to hit it: make sure the domain still ends up with
            // a dead QEMU so the recovery paths are exercised anyway.
            lab::kill_qemu(&self.cli.state(), self.dom);
        }
        if !out.status.success() {
            if out.status.code().is_none() {
                self.problem(format!(
                    "{what}: vmsnap died by a signal ({:?})",
                    out.status
                ));
            }
            if stderr.lines().count() != 1 || !stderr.starts_with("error: ") {
                self.problem(format!("{what}: not a one-line error: {stderr:?}"));
            }
        }
        out.status.success()
    }

    /// After a kill: `snapshot-list` recovers and lists every completed
    /// snapshot (and `interrupted`, if listed, joins them); images check;
    /// nothing is orphaned. Returns the listed names.
    fn after_kill(&mut self, what: &str, interrupted: Option<(&str, Expect)>) -> BTreeSet<String> {
        let out = self.cli.run(&["snapshot-list", self.dom, "--name"]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        for line in stderr.lines() {
            self.log(&format!("{what}: recovery: {line}"));
        }
        if !out.status.success() {
            self.problem(format!("{what}: snapshot-list failed: {}", stderr.trim()));
        }
        let names: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let out = self.cli.run(&["snapshot-recover", self.dom]);
        if !out.status.success() {
            self.problem(format!(
                "{what}: snapshot-recover failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        } else if !String::from_utf8_lossy(&out.stdout).contains("needs no recovery") {
            self.problem(format!(
                "{what}: snapshot-list left work for snapshot-recover: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        if let Some((name, expect)) = interrupted {
            if names.contains(name) {
                self.completed.insert(name.to_string(), expect);
            }
        }
        for name in self.completed.keys() {
            if !names.contains(name) {
                self.problems.push(format!(
                    "{what}: completed snapshot {name} lost ({names:?})"
                ));
            }
        }
        self.check_files(what);
        names
    }

    /// Every qcow2 passes `qemu-img check`; no orphan in the snapshot dir.
    fn check_files(&mut self, what: &str) {
        let snapshots = self.snapshots();
        let mut needed: BTreeSet<PathBuf> = BTreeSet::new();
        let mut images: Vec<PathBuf> = Vec::new();
        let blk = self.json(&["domblklist", self.dom]);
        for disk in blk.as_array().into_iter().flatten() {
            images.push(PathBuf::from(disk["source"].as_str().unwrap()));
            for layer in disk["backing"].as_array().into_iter().flatten() {
                images.push(PathBuf::from(layer["source"].as_str().unwrap()));
            }
        }
        for snap in &snapshots {
            for disk in snap["disks"].as_array().into_iter().flatten() {
                images.push(PathBuf::from(disk["source"].as_str().unwrap()));
            }
            if let Some(memory) = snap["memory"]["path"].as_str() {
                needed.insert(PathBuf::from(memory));
            }
        }
        for image in &images {
            match lab::backing_chain(image) {
                Ok(chain) => needed.extend(chain.into_iter().map(|(file, _)| file)),
                Err(e) => self.problem(format!("{what}: {e}")),
            }
        }
        if self.domain_state() == "running" {
            // Files QEMU has open are in use, whatever the records say.
            let out = self.cli.run(&["qmp", self.dom, "query-named-block-nodes"]);
            if let Ok(Value::Array(nodes)) = serde_json::from_slice::<Value>(&out.stdout) {
                for node in nodes {
                    if let Some(file) = node["file"].as_str() {
                        needed.insert(PathBuf::from(file));
                    }
                }
            }
        }
        let needed: BTreeSet<PathBuf> = needed
            .into_iter()
            .map(|f| std::fs::canonicalize(&f).unwrap_or(f))
            .collect();
        let dir_files = lab::files_under(&self.snapshot_dir());
        let mut to_check = vec![self.cli.path("vda.qcow2")];
        for file in &dir_files {
            let canonical = std::fs::canonicalize(file).unwrap_or(file.clone());
            if !needed.contains(&canonical) {
                self.problem(format!("{what}: orphan {}", file.display()));
            }
            if file.extension().is_some_and(|e| e == "qcow2") {
                to_check.push(file.clone());
            }
        }
        for image in to_check {
            if let Err(e) = lab::qemu_img_check(&image) {
                self.problem(format!("{what}: {e}"));
            }
        }
    }

    /// Reverts to `name` (running) and checks the guest holds what it held.
    fn reverts_exactly(&mut self, what: &str, name: &str) -> bool {
        let expect = self.completed[name].clone();
        self.guest = None;
        let out = self
            .cli
            .run(&["snapshot-revert", self.dom, name, "--running"]);
        if !out.status.success() {
            self.problem(format!(
                "{what}: revert to {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return false;
        }
        if !self.connect(&format!("{what}: revert to {name}")) {
            return false;
        }
        let guest = self.guest();
        let got = (guest.ram_value(), guest.disk_checksum("vda", OFFSET, LEN));
        match got {
            (Ok(ram), Ok(disk)) if ram == expect.ram && disk == expect.disk => true,
            (Ok(ram), Ok(disk)) => {
                let disk_ok = disk == expect.disk;
                self.problem(format!(
                    "{what}: revert to {name} gave RAM {ram:?} (expected {:?}), disk {}",
                    expect.ram,
                    if disk_ok { "exact" } else { "differs" }
                ));
                true
            }
            (ram, disk) => {
                self.problem(format!(
                    "{what}: guest after revert to {name} does not answer: {ram:?} {disk:?}"
                ));
                false
            }
        }
    }

    /// Reverts to every completed snapshot, `last` at the end (so the guest
    /// runs on it afterwards).
    fn revert_all(&mut self, what: &str, last: &str) -> bool {
        let mut names: Vec<String> = self
            .completed
            .keys()
            .filter(|n| n.as_str() != last)
            .cloned()
            .collect();
        names.push(last.to_string());
        for name in names {
            if !self.reverts_exactly(what, &name) {
                return false;
            }
        }
        true
    }

    fn finish(mut self) {
        self.guest = None;
        self.log("done");
        let _ = self.cli.run(&["destroy", self.dom]);
        assert!(
            self.problems.is_empty(),
            "{} problem(s):\n{}",
            self.problems.len(),
            self.problems.join("\n")
        );
    }
}

/// Bytes QEMU `pid` has read so far (`rchar` of /proc/PID/io).
fn read_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar: ").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Total size of the qcow2 files under `dir` and of `extra`.
fn qcow2_bytes(dir: &Path, extra: &Path) -> u64 {
    lab::files_under(dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
        .chain(std::iter::once(extra.to_path_buf()))
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn qemu_killed_during_external_revert_and_live_delete() {
    let mut b = Bench::new("qx");
    let dom = b.dom;
    b.create_ok("base", &["--external"], 1);

    // (a) Revert to base: the new QEMU dies as it starts, and while it
    // loads the memory image.
    for delay_ms in [0u64, 120, 250] {
        let what = format!("(a) revert to base, new QEMU killed {delay_ms} ms after it appeared");
        b.mark(2, "pre-a");
        let old = b.qemu_pid();
        let child = b.spawn(&["snapshot-revert", dom, "base"]);
        let mut seen: Option<Instant> = None;
        let succeeded = b.kill_qemu_when(&what, child, |b, _| {
            let pid = b.qemu_pid()?;
            if Some(pid) == old {
                return None;
            }
            let since = *seen.get_or_insert(Instant::now());
            (since.elapsed() >= Duration::from_millis(delay_ms)).then_some(pid)
        });
        b.after_kill(&what, None);
        if succeeded && b.current().as_deref() != Some("base") {
            b.problem(format!("{what}: revert succeeded but base is not current"));
        }
        let state = b.domain_state();
        if state == "running" || state == "paused" {
            b.problem(format!(
                "{what}: domain {state:?} though its QEMU was killed"
            ));
        }
        if !b.revert_all(&what, "base") {
            return b.finish();
        }
    }

    // (b) Delete mid, whose frozen image (a 40 MiB layer) is streamed live
    // into top's: QEMU dies early in the stream, and later.
    for (i, grown_mib) in [4u64, 24].into_iter().enumerate() {
        let (mid, top) = (format!("mid{i}"), format!("top{i}"));
        b.guest()
            .write_pattern("vda", 8 << 20, 40 << 20, 3 + i as u64)
            .unwrap();
        b.create_ok(&mid, &["--external"], 10 + i as u64);
        b.create_ok(&top, &["--external"], 20 + i as u64);
        b.mark(30 + i as u64, "live-b");
        let what = format!(
            "(b) delete {mid} (block-stream), QEMU killed once the images grew {grown_mib} MiB"
        );
        let pid = b.qemu_pid();
        let before = qcow2_bytes(&b.snapshot_dir(), &b.cli.path("vda.qcow2"));
        let child = b.spawn(&["snapshot-delete", dom, &mid]);
        let succeeded = b.kill_qemu_when(&what, child, |b, elapsed| {
            let grown =
                qcow2_bytes(&b.snapshot_dir(), &b.cli.path("vda.qcow2")).saturating_sub(before);
            (grown > (grown_mib << 20) || elapsed > Duration::from_millis(3000))
                .then_some(pid)
                .flatten()
        });
        let names = b.after_kill(&what, None);
        if !names.contains(&mid) {
            b.completed.remove(&mid);
        } else if succeeded {
            b.problem(format!(
                "{what}: delete succeeded but {mid} is still listed"
            ));
        }
        b.log(&format!(
            "{what}: {mid} {}",
            if names.contains(&mid) {
                "kept"
            } else {
                "deleted"
            }
        ));
        if !b.revert_all(&what, &top) {
            return b.finish();
        }
    }
    b.check_files("(b) after the reverts");
    b.finish();
}

#[test]
fn qemu_killed_during_internal_snapshot_save_and_load() {
    let mut b = Bench::new("qi");
    let dom = b.dom;
    b.create_ok("base", &[], 1);

    // (c1) Internal create with memory: QEMU dies during snapshot-save,
    // early and later in the job.
    for (i, grown_mib) in [8u64, 40].into_iter().enumerate() {
        let name = format!("c{i}");
        let what = format!("(c1) internal create {name}, QEMU killed after {grown_mib} MiB saved");
        let expect = b.mark(2 + i as u64, &name);
        let pid = b.qemu_pid();
        let disk = b.cli.path("vda.qcow2");
        let before = std::fs::metadata(&disk).unwrap().len();
        let child = b.spawn(&["snapshot-create-as", dom, &name]);
        let succeeded = b.kill_qemu_when(&what, child, |_, elapsed| {
            let grown = std::fs::metadata(&disk)
                .map(|m| m.len())
                .unwrap_or(0)
                .saturating_sub(before);
            (grown > (grown_mib << 20) || elapsed > Duration::from_millis(5000))
                .then_some(pid)
                .flatten()
        });
        let names = b.after_kill(&what, Some((&name, expect)));
        if succeeded && !names.contains(&name) {
            b.problem(format!("{what}: create succeeded but {name} is not listed"));
        }
        b.log(&format!(
            "{what}: {name} {}",
            if names.contains(&name) {
                "kept"
            } else {
                "absent"
            }
        ));
        if !b.revert_all(&what, "base") {
            return b.finish();
        }
    }

    // (c2) Revert to c1 (or base) in the running QEMU: it dies during
    // snapshot-load.
    let target = b
        .completed
        .keys()
        .find(|n| n.starts_with('c'))
        .cloned()
        .unwrap_or_else(|| "base".to_string());
    let target = target.as_str();
    let what = format!("(c2) internal revert to {target}, QEMU killed during snapshot-load");
    b.mark(3, "pre-c2");
    let old = b.qemu_pid();
    let start_read = old.map(read_bytes).unwrap_or(0);
    let child = b.spawn(&["snapshot-revert", dom, target]);
    let mut seen: Option<Instant> = None;
    let succeeded = b.kill_qemu_when(&what, child, |b, elapsed| {
        let pid = b.qemu_pid()?;
        if Some(pid) != old {
            // A revert that starts a new QEMU: kill it once it reads.
            let since = *seen.get_or_insert(Instant::now());
            return (read_bytes(pid) > (16 << 20) || since.elapsed() > Duration::from_millis(300))
                .then_some(pid);
        }
        (read_bytes(pid).saturating_sub(start_read) > (16 << 20)
            || elapsed > Duration::from_millis(2000))
        .then_some(pid)
    });
    b.after_kill(&what, None);
    if succeeded && b.current().as_deref() != Some(target) {
        b.problem(format!(
            "{what}: revert succeeded but {target} is not current"
        ));
    }
    if !b.revert_all(&what, "base") {
        return b.finish();
    }
    b.check_files("(c) after the reverts");
    b.finish();
}
