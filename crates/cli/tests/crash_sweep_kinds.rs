//! Crash safety of every snapshot kind (DESIGN §5 promise 4, issue 5): the
//! named-failpoint sweep of snapshot_crash.rs (which covers the external
//! memory+disk create of a running guest) extended to
//!
//! - (a) disk-only external snapshots of a running guest: create, revert to
//!   one, delete one that has a child (its frozen image streamed into an
//!   inner overlay) and a leaf (streamed into the active one);
//! - (b) internal disk-only snapshots of a running guest (`--disk-only
//!   --diskspec vda,snapshot=internal`, QEMU's blockdev-snapshot-internal-sync
//!   transaction): create, revert, delete one that has a child;
//! - (c) external snapshots of a stopped domain (overlays made by vmsnap's
//!   engine, offline rebase merges): create, revert, delete an inner one and
//!   a leaf;
//! - (d) revert to, and delete of (an inner one and a leaf, live
//!   block-stream merges), external memory+disk snapshots of a running guest
//!   (snapshot_crash.rs sweeps their create).
//!
//! Each operation's steps are learnt from a run that completes
//! (`VMSNAP_FAILPOINT_LOG`, which also names the domain start/stop steps a
//! revert passes through). Then, for each step, vmsnap kills itself there
//! (`VMSNAP_FAILPOINTS`), `vmsnap snapshot-list DOM` recovers, and the test
//! checks that
//! - the operation is fully done or not at all: a create or delete is done
//!   exactly when it was killed after its commit; a revert killed after its
//!   first step is finished by the recovery (so the domain runs, or is shut
//!   off, on the target's data), one killed at its first step changed nothing;
//! - the guest (running kinds) or the domain's image (stopped kind) holds
//!   what it held before, unless a revert was finished;
//! - every snapshot completed before is still listed, and its disk bytes
//!   read back exactly (`qemu-img convert -U`, `-l` for internal ones);
//! - every image passes `qemu-img check` (leaked clusters allowed);
//! - no file in the domain's snapshot directory and no internal snapshot in
//!   its images is left that no snapshot and no live disk needs, and a
//!   running QEMU's disk is the image the records name;
//! - a running domain has exactly one QEMU, a stopped one none;
//! - `vmsnap snapshot-recover DOM` then finds nothing left to do.
//!
//! At the end every surviving snapshot is reverted to, and the guest's RAM
//! value and disk checksum (over its control channel) or the stopped
//! domain's image bytes are compared with what the snapshot captured.
//!
//! Runtime is kept low by sharing one booted guest per kind: reverts that a
//! recovery finishes are judged from the images and QEMU's pid (a fresh boot
//! is awaited only where the guest must answer).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::{pattern_checksum, sha256_hex, Guest};

/// The guest disk range every mark writes and every check reads.
const OFFSET: u64 = 2 << 20;
const LEN: u64 = 256 << 10;

/// How long a fresh guest may take to boot under TCG on a loaded machine.
const BOOT: Duration = Duration::from_secs(150);

/// Longest any single vmsnap command may take before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// What a snapshot (or the live domain) must read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expect {
    /// sha256 of the disk range.
    disk: String,
    /// The guest's RAM value (memory snapshots and a running guest only).
    ram: Option<String>,
}

impl Expect {
    fn disk_only(&self) -> Expect {
        Expect {
            disk: self.disk.clone(),
            ram: None,
        }
    }
}

/// One domain of one kind under test, and what it must still hold.
struct Sweep {
    bench: VmsnapCli,
    dom: &'static str,
    running: bool,
    guest: Option<Guest>,
    /// Completed snapshots and what each must read back.
    completed: BTreeMap<String, Expect>,
    problems: Vec<String>,
    runs: u32,
    started: Instant,
}

impl Sweep {
    fn new(prefix: &str, dom: &'static str, running: bool) -> Sweep {
        let bench =
            VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), &format!("vmsnap-{prefix}"));
        bench.guard(dom);
        let disk = bench.path("vda.qcow2");
        lab::create_qcow2(&disk, "32M");
        let disks = [DiskDef::qcow2("vda", disk.to_str().unwrap())];
        let config = if running {
            bench.write_guest_config(dom, 128, &disks)
        } else {
            let path = bench.path(&format!("{dom}.toml"));
            std::fs::write(&path, lab::stopped_domain_toml(dom, 128, &disks)).unwrap();
            path
        };
        bench.ok(&["define", config.to_str().unwrap()]);
        let mut sweep = Sweep {
            bench,
            dom,
            running,
            guest: None,
            completed: BTreeMap::new(),
            problems: Vec::new(),
            runs: 0,
            started: Instant::now(),
        };
        if running {
            sweep.ok(&["start", dom]);
            sweep.connect("boot");
        }
        sweep
    }

    fn problem(&mut self, message: String) {
        eprintln!("PROBLEM: {message}");
        self.problems.push(message);
    }

    /// Runs vmsnap with `args` and `env` (killed if it hangs).
    fn run_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.runs += 1;
        let out_path = self.bench.path(&format!("run{}.out", self.runs));
        let err_path = self.bench.path(&format!("run{}.err", self.runs));
        let mut command = self.bench.command(args);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap())
            .spawn()
            .expect("spawn vmsnap");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmsnap {args:?} hung for {COMMAND_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = Output {
            status,
            stdout: std::fs::read(&out_path).unwrap(),
            stderr: std::fs::read(&err_path).unwrap(),
        };
        let _ = std::fs::remove_file(out_path);
        let _ = std::fs::remove_file(err_path);
        out
    }

    fn ok(&mut self, args: &[&str]) -> String {
        let out = self.run_env(args, &[]);
        assert!(
            out.status.success(),
            "vmsnap {args:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&mut self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// The steps `args` passes (failpoint names, in order, each once), from
    /// a run that must complete.
    fn steps(&mut self, args: &[&str]) -> Vec<String> {
        let log = self.bench.path(&format!("steps{}.log", self.runs));
        let out = self.run_env(args, &[("VMSNAP_FAILPOINT_LOG", log.to_str().unwrap())]);
        assert!(
            out.status.success(),
            "probe vmsnap {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut steps: Vec<String> = Vec::new();
        for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
            if !steps.iter().any(|s| s == line) {
                steps.push(line.to_string());
            }
        }
        eprintln!("[{}] steps of {args:?}: {steps:?}", self.dom);
        steps
    }

    /// Runs `args` armed to die at `step`, then the next command
    /// (`snapshot-list`) recovers; returns the snapshots it lists.
    fn crash(&mut self, what: &str, args: &[&str], step: &str) -> BTreeSet<String> {
        let out = self.run_env(args, &[("VMSNAP_FAILPOINTS", step)]);
        if out.status.signal() != Some(9) {
            self.problem(format!(
                "{what}: vmsnap was not killed at its failpoint ({:?}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let out = self.run_env(&["snapshot-list", self.dom, "--name"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        for line in stderr.lines() {
            eprintln!("[{}] {what}: {line}", self.dom);
        }
        if !out.status.success() {
            self.problem(format!(
                "{what}: snapshot-list after the kill failed: {}",
                stderr.trim()
            ));
        }
        let names = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let out = self.run_env(&["snapshot-recover", self.dom], &[]);
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || !said.contains("needs no recovery") {
            self.problem(format!(
                "{what}: snapshot-list left work for snapshot-recover: {} {}",
                said.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        names
    }

    // ----- the guest -----

    /// (Re)connects to the guest, waiting for a boot if need be.
    fn connect(&mut self, what: &str) -> bool {
        self.guest = None;
        match Guest::connect(self.bench.control_socket(), BOOT) {
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

    /// Writes a new disk range (pattern `seed`) and RAM value to the live
    /// domain (through the guest, or into a stopped domain's image).
    fn mark(&mut self, seed: u64, ram: &str) -> Expect {
        if self.running {
            let guest = self.guest.as_mut().expect("guest connected");
            guest.write_pattern("vda", OFFSET, LEN, seed).unwrap();
            guest.set_ram_value(ram).unwrap();
            Expect {
                disk: pattern_checksum(OFFSET, LEN, seed).unwrap(),
                ram: Some(ram.to_string()),
            }
        } else {
            let byte = (seed % 251 + 1) as u8;
            let (top, _) = self.live_top();
            lab::qemu_io(&top, &format!("write -q -P {byte} {OFFSET} {LEN}"));
            Expect {
                disk: sha256_hex(&vec![byte; LEN as usize]),
                ram: None,
            }
        }
    }

    /// Checks the live domain still holds `expect` (the guest answers with
    /// its RAM value and disk checksum; a stopped domain's image reads it).
    fn holds(&mut self, what: &str, expect: &Expect) {
        if !self.running {
            let (top, format) = self.live_top();
            match image_sum(&self.bench.path("scratch.raw"), &top, &format, None) {
                Ok(sum) if sum == expect.disk => {}
                Ok(_) => self.problem(format!(
                    "{what}: the domain's image {} does not hold what it held",
                    top.display()
                )),
                Err(e) => self.problem(format!("{what}: {e}")),
            }
            return;
        }
        if self.guest.is_none() && !self.connect(what) {
            return;
        }
        let guest = self.guest.as_mut().unwrap();
        let ram = guest.ram_value();
        let disk = guest.disk_checksum("vda", OFFSET, LEN);
        match (ram, disk) {
            (Ok(ram), Ok(disk)) => {
                if let Some(want) = &expect.ram {
                    if &ram != want {
                        self.problem(format!(
                            "{what}: guest RAM value {ram:?}, expected {want:?}"
                        ));
                    }
                }
                if disk != expect.disk {
                    self.problem(format!("{what}: guest disk checksum differs"));
                }
            }
            (ram, disk) => self.problem(format!("{what}: guest does not answer: {ram:?} {disk:?}")),
        }
    }

    // ----- the domain as vmsnap records it -----

    fn snapshots(&mut self) -> Vec<Value> {
        let dom = self.dom;
        match self.json(&["snapshot-list", dom]) {
            Value::Array(list) => list,
            other => panic!("snapshot-list --json: {other}"),
        }
    }

    fn current(&mut self) -> Option<String> {
        self.snapshots()
            .into_iter()
            .find(|s| s["current"] == Value::Bool(true))
            .and_then(|s| s["name"].as_str().map(String::from))
    }

    /// The live top image of vda and its format.
    fn live_top(&mut self) -> (PathBuf, String) {
        let dom = self.dom;
        let list = self.json(&["domblklist", dom]);
        let disk = &list[0];
        (
            PathBuf::from(disk["source"].as_str().unwrap()),
            disk["format"].as_str().unwrap().to_string(),
        )
    }

    /// Every file of vda's live chain.
    fn live_chain(&mut self) -> Vec<PathBuf> {
        let dom = self.dom;
        let list = self.json(&["domblklist", dom]);
        let disk = &list[0];
        let mut files = vec![PathBuf::from(disk["source"].as_str().unwrap())];
        for layer in disk["backing"].as_array().into_iter().flatten() {
            files.push(PathBuf::from(layer["source"].as_str().unwrap()));
        }
        files
    }

    fn domain_state(&mut self) -> String {
        let list = self.json(&["list", "--all"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == self.dom)
            .and_then(|d| d["state"].as_str())
            .unwrap_or("?")
            .to_string()
    }

    fn pid_file(&self) -> PathBuf {
        self.bench
            .state()
            .join("domains")
            .join(self.dom)
            .join("qemu.pid")
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.bench
            .state()
            .join("domains")
            .join(self.dom)
            .join("snapshots")
    }

    /// Live QEMU processes started for this domain (by their -pidfile).
    fn qemu_processes(&self) -> Vec<u32> {
        let wanted = self.pid_file();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            if args.windows(2).any(|pair| {
                pair[0] == b"-pidfile"
                    && Path::new(std::str::from_utf8(pair[1]).unwrap_or("")) == wanted
            }) {
                found.push(pid);
            }
        }
        found
    }

    // ----- the checks after every kill -----

    /// Everything the promises say must hold after a recovery.
    fn check_all(&mut self, what: &str, names: &BTreeSet<String>) {
        let scratch = self.bench.path("scratch.raw");
        let snapshots = self.snapshots();
        // Completed snapshots: listed, and their bytes exact.
        let completed = self.completed.clone();
        for (name, expect) in &completed {
            if !names.contains(name) {
                self.problem(format!(
                    "{what}: completed snapshot {name} lost ({names:?})"
                ));
                continue;
            }
            let Some(snap) = snapshots.iter().find(|s| s["name"] == name.as_str()) else {
                continue;
            };
            for disk in snap["disks"].as_array().into_iter().flatten() {
                let tag = (disk["mode"] == "internal").then_some(name.as_str());
                let source = Path::new(disk["source"].as_str().unwrap());
                let format = disk["source_format"].as_str().unwrap();
                match image_sum(&scratch, source, format, tag) {
                    Ok(sum) if sum == expect.disk => {}
                    Ok(_) => self.problem(format!(
                        "{what}: snapshot {name} no longer reads back its disk bytes"
                    )),
                    Err(e) => self.problem(format!("{what}: snapshot {name}: {e}")),
                }
            }
            if expect.ram.is_some() {
                let memory = snap["memory"]["path"].as_str().map(PathBuf::from);
                let ok = memory
                    .as_ref()
                    .is_some_and(|m| m.metadata().is_ok_and(|md| md.len() > 0));
                if !ok {
                    self.problem(format!("{what}: snapshot {name} lost its memory image"));
                }
            }
        }
        // What the snapshots and the live disk need, with the internal
        // snapshots each image holds.
        let mut needed: BTreeSet<PathBuf> = BTreeSet::new();
        let mut internal: BTreeSet<String> = BTreeSet::new();
        let mut images: Vec<PathBuf> = self.live_chain();
        for snap in &snapshots {
            for disk in snap["disks"].as_array().into_iter().flatten() {
                images.push(PathBuf::from(disk["source"].as_str().unwrap()));
                if disk["mode"] == "internal" {
                    internal.insert(snap["name"].as_str().unwrap().to_string());
                }
            }
            if let Some(memory) = snap["memory"]["path"].as_str() {
                needed.insert(PathBuf::from(memory));
            }
        }
        let mut tags: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
        for image in &images {
            match lab::backing_chain(image) {
                Ok(chain) => {
                    for (file, file_tags) in chain {
                        needed.insert(file.clone());
                        tags.insert(file, file_tags);
                    }
                }
                Err(e) => self.problem(format!("{what}: {e}")),
            }
        }
        if self.running {
            // Files QEMU has open are in use, whatever the records say.
            let dom = self.dom;
            let out = self.run_env(&["qmp", dom, "query-named-block-nodes"], &[]);
            if let Ok(Value::Array(nodes)) = serde_json::from_slice::<Value>(&out.stdout) {
                for node in nodes {
                    if let Some(file) = node["file"].as_str() {
                        needed.insert(PathBuf::from(file));
                    }
                }
            }
            // The guest's disk is the image the records name.
            let out = self.run_env(&["qmp", dom, "query-block"], &[]);
            let devices: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let inserted = devices
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["qdev"].as_str().is_some_and(|q| q.contains("/vda/")))
                .and_then(|d| d["inserted"]["file"].as_str())
                .map(PathBuf::from);
            let recorded = self.live_top().0;
            if inserted.as_ref() != Some(&recorded) {
                self.problem(format!(
                    "{what}: QEMU's vda is {inserted:?}, the records say {}",
                    recorded.display()
                ));
            }
        }
        let dir_files = lab::files_under(&self.snapshot_dir());
        for file in &dir_files {
            if !needed.contains(file) {
                self.problem(format!("{what}: orphan {}", file.display()));
            }
        }
        for file in needed.iter().chain(&dir_files) {
            if file.extension().is_some_and(|e| e == "qcow2") && file.exists() {
                if let Err(e) = lab::qemu_img_check(file) {
                    self.problem(format!("{what}: {e}"));
                }
            }
        }
        for (file, file_tags) in &tags {
            for tag in file_tags {
                if !internal.contains(tag) {
                    self.problem(format!(
                        "{what}: internal snapshot {tag} in {} belongs to no snapshot",
                        file.display()
                    ));
                }
            }
        }
        // QEMU: one for a running domain, none for a stopped one.
        let qemus = self.qemu_processes();
        let state = self.domain_state();
        let recorded = lab::qemu_pid(&self.bench.state(), self.dom);
        if self.running {
            if state != "running" {
                self.problem(format!("{what}: domain is {state:?}, not running"));
            }
            if qemus.len() != 1 || recorded != qemus.first().copied() {
                self.problem(format!(
                    "{what}: QEMU processes {qemus:?}, pid file names {recorded:?}"
                ));
            }
        } else {
            if state != "shut off" {
                self.problem(format!("{what}: domain is {state:?}, not shut off"));
            }
            if !qemus.is_empty() {
                self.problem(format!(
                    "{what}: QEMU processes {qemus:?} for a stopped domain"
                ));
            }
        }
        eprintln!(
            "[{}] {what}: checked ({:.1}s)",
            self.dom,
            self.started.elapsed().as_secs_f64()
        );
    }

    // ----- the sweeps -----

    fn create_args<'a>(&self, name: &'a str, flags: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["snapshot-create-as", self.dom, name];
        args.extend_from_slice(flags);
        args
    }

    /// Creates snapshot `name` (after a fresh mark) and records it as completed.
    fn create_ok(&mut self, name: &str, flags: &[&str], seed: u64) -> Expect {
        let expect = self.mark(seed, name);
        let args = self.create_args(name, flags);
        self.ok(&args);
        let kept = if self.memory_kind(flags) {
            expect.clone()
        } else {
            expect.disk_only()
        };
        self.completed.insert(name.to_string(), kept);
        expect
    }

    fn memory_kind(&self, flags: &[&str]) -> bool {
        self.running && !flags.contains(&"--disk-only")
    }

    fn delete_ok(&mut self, name: &str) {
        let dom = self.dom;
        self.ok(&["snapshot-delete", dom, name]);
        self.completed.remove(name);
    }

    /// Kills a create (with `flags`) at each of its steps.
    fn create_sweep(&mut self, flags: &[&str]) {
        self.mark(5, "probe");
        let args = self.create_args("probe", flags);
        let steps = self.steps(&args);
        assert!(steps.len() >= 3, "too few steps: {steps:?}");
        self.delete_ok("probe");
        for (i, step) in steps.iter().enumerate() {
            let name = format!("c{i}");
            let what = format!("create {name} ({flags:?}) killed at {step}");
            let expect = self.mark(10 + i as u64, &name);
            let args = self.create_args(&name, flags);
            let names = self.crash(&what, &args, step);
            let done = step.ends_with(".committed");
            if names.contains(&name) != done {
                self.problem(format!("{what}: snapshot listed: {}", !done));
            }
            if names.contains(&name) {
                let kept = if self.memory_kind(flags) {
                    expect.clone()
                } else {
                    expect.disk_only()
                };
                self.completed.insert(name.clone(), kept);
            }
            self.check_all(&what, &names);
            self.holds(&what, &expect);
        }
    }

    /// Kills a revert to `target` (with `flags`) at each of its steps.
    fn revert_sweep(&mut self, target: &str, flags: &[&str]) {
        let dom = self.dom;
        let mut args = vec!["snapshot-revert", dom, target];
        args.extend_from_slice(flags);
        let wanted = self.completed[target].clone();
        self.guest = None;
        let steps = self.steps(&args);
        assert!(steps.len() >= 3, "too few steps: {steps:?}");
        for (i, step) in steps.iter().enumerate() {
            let what = format!("revert to {target} killed at {step}");
            let first = step == "snapshot.revert.begin";
            // Where it is cheap, the domain first gets data the target lacks,
            // so content alone tells a finished revert from one not done. A
            // disk-only revert's guest would have to boot first: there only
            // the first step (not done) is marked, and the others are judged
            // by QEMU's pid and the images.
            let marked = (first || wanted.ram.is_some() || !self.running).then(|| {
                if self.running && self.guest.is_none() {
                    self.connect(&what);
                }
                self.mark(50 + i as u64, &format!("pre{i}"))
            });
            let pid = lab::qemu_pid(&self.bench.state(), dom);
            self.guest = None;
            let names = self.crash(&what, &args, step);
            self.check_all(&what, &names);
            if first {
                self.holds(&what, marked.as_ref().unwrap());
                continue;
            }
            // Finished: on the target's data, in a new QEMU if it runs.
            if self.current().as_deref() != Some(target) {
                self.problem(format!("{what}: {target} is not the current snapshot"));
            }
            if self.running {
                let now = lab::qemu_pid(&self.bench.state(), dom);
                if now.is_none() || now == pid {
                    self.problem(format!("{what}: QEMU {pid:?} was not replaced ({now:?})"));
                }
            }
            if wanted.ram.is_some() || !self.running {
                if self.running {
                    self.connect(&what);
                }
                self.holds(&what, &wanted);
            } else {
                let (top, format) = self.live_top();
                match image_sum(&self.bench.path("scratch.raw"), &top, &format, None) {
                    Ok(sum) if sum == wanted.disk => {}
                    Ok(_) => self.problem(format!(
                        "{what}: the domain does not run on {target}'s disk bytes"
                    )),
                    Err(e) => self.problem(format!("{what}: {e}")),
                }
            }
        }
        // The guest the last finished revert started sees the target's disk.
        if self.running {
            self.connect("after the revert sweep");
            self.holds("after the revert sweep", &wanted.disk_only());
        }
    }

    /// Kills the delete of a snapshot that has a child (with `leaf`, of a
    /// leaf) at each of its steps.
    fn delete_sweep(&mut self, flags: &[&str], leaf: bool) {
        let dom = self.dom;
        let kind = if leaf { "leaf" } else { "inner" };
        // Learn the steps on a probe of the same shape.
        self.create_ok("pm", flags, 7);
        if !leaf {
            self.create_ok("pl", flags, 8);
        }
        self.mark(9, "probe-live");
        let merge = self.merge_step("pm");
        let mut steps = self.steps(&["snapshot-delete", dom, "pm"]);
        self.completed.remove("pm");
        // The victim's merge is swept under its own name in every round; a
        // delete may also merge layers earlier deletes left (named after
        // whatever this history made), which go through the same steps.
        if let Some(merge) = &merge {
            assert!(
                steps.contains(merge),
                "the merge step is named after the victim's source and overlay: {merge} not in {steps:?}"
            );
        }
        steps.retain(|step| {
            !step.starts_with("snapshot.delete.merge-") || Some(step) == merge.as_ref()
        });
        for step in steps.iter_mut() {
            if Some(&*step) == merge.as_ref() {
                *step = "MERGE".into();
            }
        }
        if !leaf {
            self.delete_ok("pl");
        }
        for (i, step) in steps.iter().enumerate() {
            let victim = format!("{}m{i}", &kind[..1]);
            let child = format!("{}l{i}", &kind[..1]);
            self.create_ok(&victim, flags, 60 + 2 * i as u64);
            if !leaf {
                self.create_ok(&child, flags, 61 + 2 * i as u64);
            }
            let live = self.mark(90 + i as u64, &format!("live{i}"));
            let armed = if step == "MERGE" {
                self.merge_step(&victim)
                    .expect("the victim's delete merges as the probe's did")
            } else {
                step.clone()
            };
            let what = format!("delete {kind} {victim} killed at {armed}");
            let names = self.crash(&what, &["snapshot-delete", dom, &victim], &armed);
            let done = step.ends_with(".committed");
            if names.contains(&victim) == done {
                self.problem(format!("{what}: victim listed: {}", !done));
            }
            if !names.contains(&victim) {
                self.completed.remove(&victim);
            }
            self.check_all(&what, &names);
            self.holds(&what, &live);
            // Clean up with plain deletes, which must work now.
            if !leaf {
                self.delete_ok(&child);
            }
            if self.completed.contains_key(&victim) {
                self.delete_ok(&victim);
            }
        }
    }

    /// The failpoint of the step merging `name`'s frozen image into its
    /// overlay on its delete (`None` for an internal snapshot).
    fn merge_step(&mut self, name: &str) -> Option<String> {
        let snap = self
            .snapshots()
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap();
        let disk = &snap["disks"][0];
        let overlay = disk["overlay"].as_str()?;
        let source = disk["source"].as_str().unwrap();
        let step: String = format!("merge {source} into {overlay}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        Some(format!("snapshot.delete.{step}"))
    }

    /// Reverts to every surviving snapshot and checks what it brings back.
    fn final_reverts(&mut self) {
        let dom = self.dom;
        let completed = self.completed.clone();
        for (name, expect) in &completed {
            let what = format!("final revert to {name}");
            self.guest = None;
            if self.running {
                self.ok(&["snapshot-revert", dom, name, "--running"]);
                if self.connect(&what) {
                    self.holds(&what, expect);
                }
            } else {
                self.ok(&["snapshot-revert", dom, name]);
                self.holds(&what, expect);
            }
        }
        let names: BTreeSet<String> = self
            .ok(&["snapshot-list", dom, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        self.check_all("after the final reverts", &names);
    }

    fn finish(mut self) {
        self.guest = None;
        let elapsed = self.started.elapsed();
        eprintln!("[{}] done in {:.1}s", self.dom, elapsed.as_secs_f64());
        if self.running {
            let _ = self.run_env(&["destroy", self.dom], &[]);
        }
        assert!(
            self.problems.is_empty(),
            "{} problem(s):\n{}",
            self.problems.len(),
            self.problems.join("\n")
        );
    }
}

/// sha256 of the disk range of `image` (or of its internal snapshot `tag`),
/// read through its backing chain with `qemu-img convert -U` into `scratch`.
fn image_sum(
    scratch: &Path,
    image: &Path,
    format: &str,
    tag: Option<&str>,
) -> Result<String, String> {
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-U", "-f", format, "-O", "raw"]);
    if let Some(tag) = tag {
        command.arg("-l").arg(format!("snapshot.name={tag}"));
    }
    let out = command.arg(image).arg(scratch).output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert {} ({tag:?}): {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut file = File::open(scratch).unwrap();
    file.seek(SeekFrom::Start(OFFSET)).unwrap();
    let mut bytes = vec![0u8; LEN as usize];
    file.read_exact(&mut bytes).unwrap();
    Ok(sha256_hex(&bytes))
}

#[test]
fn disk_only_external_snapshots_of_a_running_guest() {
    let mut s = Sweep::new("sweep-dx", "dx", true);
    let flags = ["--disk-only"];
    s.create_ok("base", &flags, 1);
    s.create_sweep(&flags);
    s.revert_sweep("base", &["--running"]);
    s.delete_sweep(&flags, false);
    s.delete_sweep(&flags, true);
    s.final_reverts();
    s.finish();
}

#[test]
fn internal_disk_only_snapshots_of_a_running_guest() {
    let mut s = Sweep::new("sweep-di", "di", true);
    let flags = ["--disk-only", "--diskspec", "vda,snapshot=internal"];
    s.create_ok("base", &flags, 1);
    s.create_sweep(&flags);
    s.revert_sweep("base", &["--running"]);
    s.delete_sweep(&flags, false);
    s.final_reverts();
    s.finish();
}

#[test]
fn external_snapshots_of_a_stopped_domain() {
    let mut s = Sweep::new("sweep-st", "st", false);
    let flags = ["--external"];
    s.create_ok("base", &flags, 1);
    s.create_sweep(&flags);
    s.revert_sweep("base", &[]);
    s.delete_sweep(&flags, false);
    s.delete_sweep(&flags, true);
    s.final_reverts();
    s.finish();
}

#[test]
fn revert_and_delete_of_external_memory_snapshots() {
    let mut s = Sweep::new("sweep-mx", "mx", true);
    let flags = ["--external"];
    s.create_ok("base", &flags, 1);
    s.revert_sweep("base", &[]);
    s.delete_sweep(&flags, false);
    s.delete_sweep(&flags, true);
    s.final_reverts();
    s.finish();
}
