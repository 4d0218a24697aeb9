//! Shared harness of the hardening tests: the real `vmsnap` binary in its own
//! temporary state directory, domains booting the test guest (TCG), and the
//! checks every refusal must pass (non-zero exit, one line, nothing changed).
//!
//! Every command runs under `timeout -s KILL`, so a vmsnap or QEMU that hangs
//! fails the test instead of stalling the suite; every QEMU a lab started is
//! killed when the lab is dropped.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vmsnap_testguest::{lab, Guest};

/// Longest any single vmsnap command may take before it counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a fresh guest may take to boot under TCG on a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

/// One `[[disk]]` of a domain config; in a [`Lab`] its `file` is relative to
/// the lab directory.
pub use vmsnap_testguest::lab::DiskDef;

/// A temporary directory with a private vmsnap state directory inside.
pub struct Lab {
    dir: tempfile::TempDir,
    domains: std::cell::RefCell<Vec<String>>,
    umask: std::cell::Cell<Option<u32>>,
}

impl Lab {
    /// A fresh lab; `prefix` names the temp dir so leftovers are traceable.
    pub fn new(prefix: &str) -> Lab {
        Lab {
            dir: tempfile::Builder::new()
                .prefix(&format!("vmsnap-{prefix}"))
                .tempdir()
                .expect("temp dir"),
            domains: Default::default(),
            umask: Default::default(),
        }
    }

    /// A path inside the lab directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lab's state directory (passed with --state-dir).
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Runs every later command under this umask (e.g. 0 to prove vmsnap
    /// does not rely on the caller's umask for privacy).
    pub fn set_umask(&self, umask: u32) {
        self.umask.set(Some(umask));
    }

    /// The vmsnap binary with this lab's state directory, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        let umask = self
            .umask
            .get()
            .map_or(String::new(), |u| format!("umask {u:03o}; "));
        command
            .arg("-c")
            .arg(format!("{umask}exec timeout -s KILL \"$0\" \"$@\""))
            .arg(COMMAND_TIMEOUT.as_secs().to_string())
            .arg(env!("CARGO_BIN_EXE_vmsnap"));
        self.vmsnap_args(&mut command, args);
        command
    }

    /// The vmsnap binary without the timeout wrapper, for wall-time measurements.
    pub fn bare_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
        self.vmsnap_args(&mut command, args);
        command
    }

    /// vmsnap's arguments after the binary: this lab's state directory (never
    /// the caller's `VMSNAP_STATE_DIR`), then `args`, run in the lab directory.
    fn vmsnap_args(&self, command: &mut Command, args: &[&str]) {
        command
            .arg("--state-dir")
            .arg(self.state())
            .args(args)
            .env_remove("VMSNAP_STATE_DIR")
            .current_dir(self.dir.path());
    }

    /// Runs vmsnap with `args` and returns what it did.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("spawn vmsnap");
        assert_ne!(
            out.status.code(),
            Some(137),
            "vmsnap {args:?} hung for {COMMAND_TIMEOUT:?} and was killed"
        );
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmsnap {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command that must be refused: non-zero exit, nothing on
    /// stdout, and exactly one line on stderr starting with `error: ` and
    /// free of control characters. Returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        refusal(args, &out)
    }

    /// Writes `NAME.toml` (the test guest, 128 MiB, TCG, its control channel
    /// on `NAME.ctl`) and defines it. Disk files must exist.
    pub fn define(&self, name: &str, disks: &[DiskDef<'_>]) -> PathBuf {
        let config = self.write_config(name, 128, disks);
        self.ok(&["define", config.to_str().unwrap()]);
        self.domains.borrow_mut().push(name.to_string());
        config
    }

    /// Writes a domain config without defining it.
    pub fn write_config(&self, name: &str, memory_mib: u32, disks: &[DiskDef<'_>]) -> PathBuf {
        let files: Vec<String> = disks
            .iter()
            .map(|disk| self.path(disk.file).display().to_string())
            .collect();
        let disks: Vec<DiskDef<'_>> = disks
            .iter()
            .zip(&files)
            .map(|(disk, file)| DiskDef { file, ..*disk })
            .collect();
        let config =
            lab::guest_domain_toml(name, memory_mib, &self.control_socket(name), &[], &disks);
        let path = self.path(&format!("{name}.toml"));
        fs::write(&path, config).expect("write config");
        path
    }

    /// Remembers a domain defined by hand, so Drop kills its QEMU.
    pub fn track(&self, name: &str) {
        self.domains.borrow_mut().push(name.to_string());
    }

    /// The guest control socket of domain `name`.
    pub fn control_socket(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.ctl"))
    }

    /// Creates an image with qemu-img (`args` after `create -q`).
    pub fn qemu_img_create(&self, args: &[&str]) {
        let out = Command::new("qemu-img")
            .args(["create", "-q"])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img create {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the domain and connects to its booted guest.
    pub fn start_guest(&self, name: &str) -> Guest {
        self.ok(&["start", name]);
        self.connect(name)
    }

    /// Connects (again) to a domain's guest, e.g. after a revert.
    pub fn connect(&self, name: &str) -> Guest {
        Guest::connect(self.control_socket(name), BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("guest of {name} did not answer: {e}"))
    }

    /// QEMU's pid from the domain's pid file, if it is running.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        lab::qemu_pid(&self.state(), name)
    }

    /// Names from `snapshot-list --name`, sorted.
    pub fn snapshot_names(&self, domain: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .ok(&["snapshot-list", domain, "--name"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect();
        names.sort();
        names
    }

    /// `domblklist` as target -> source.
    pub fn disk_sources(&self, domain: &str) -> BTreeMap<String, String> {
        self.ok(&["domblklist", domain])
            .lines()
            .skip(2)
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    }

    /// The domain's state column in `list --all`.
    pub fn domain_state(&self, domain: &str) -> String {
        let list = self.ok(&["list", "--all"]);
        list.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(domain))
            .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{domain} not in {list}"))
    }

    /// Every file under the state directory with its type and size, except
    /// the files whose content legitimately changes on every command (the
    /// metadata store and its journal, QEMU's console log).
    pub fn state_files(&self) -> BTreeMap<PathBuf, String> {
        let mut files = BTreeMap::new();
        walk(&self.state(), &mut |path, meta| {
            let rel = path.strip_prefix(self.state()).unwrap().to_path_buf();
            let name = rel.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("vmsnap.db") || name == "serial.log" {
                files.insert(rel, "store/log".to_string());
            } else {
                files.insert(rel, format!("{:?}", meta.file_type()));
            }
        });
        files
    }

    /// Every entry of the lab directory outside the state directory.
    pub fn lab_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        walk(self.dir.path(), &mut |path, _| {
            if !path.starts_with(self.state()) {
                files.push(path.strip_prefix(self.dir.path()).unwrap().to_path_buf());
            }
        });
        files.sort();
        files
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Never leave a QEMU behind, whatever the test did.
        for name in self.domains.borrow().iter() {
            lab::kill_qemu(&self.state(), name);
        }
    }
}

/// Checks that `out` is a clean refusal of `vmsnap args` and returns its line.
pub fn refusal(args: &[&str], out: &Output) -> String {
    lab::refusal(args, out)
}

fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        visit(&path, &meta);
        if meta.is_dir() {
            walk(&path, visit);
        }
    }
}

/// Every entry under `root` (itself included) whose permission bits are not
/// private: directories must be 0700, files and sockets 0600 or stricter.
pub fn non_private_entries(root: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |path: &Path, meta: &fs::Metadata| {
        let mode = meta.permissions().mode() & 0o777;
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.file_type().is_socket() {
            "socket"
        } else if meta.file_type().is_symlink() {
            return;
        } else {
            "file"
        };
        let allowed = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode & !allowed != 0 || meta.uid() != current_uid() {
            bad.push(format!("{kind} {} is {mode:o}", path.display()));
        }
    };
    let meta = fs::symlink_metadata(root).expect("state dir exists");
    check(root, &meta);
    walk(root, &mut check);
    bad
}

fn current_uid() -> u32 {
    fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

/// `qemu-img check -U` (QEMU may hold the image): Ok on a clean or
/// leaks-only image, Err with qemu-img's report otherwise.
pub fn qemu_img_check(image: &Path) -> Result<(), String> {
    lab::qemu_img_check(image)
}

/// sha256 of a host file's byte range, in the test guest's hex format.
pub fn host_checksum(path: &Path, offset: u64, len: u64) -> String {
    let data = fs::read(path).expect("read image");
    let start = offset as usize;
    let end = (offset + len) as usize;
    vmsnap_testguest::sha256_hex(&data[start..end])
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tmpfs mounted inside a lab for the test's lifetime (unmounted on drop).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "16m") at `path` (created if needed).
    pub fn mount(path: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&path)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mount tmpfs at {} (needs root)",
            path.display()
        );
        Tmpfs { path }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A soft-assertion list: a test records every broken promise, then fails
/// once with all of them, so one run shows the whole picture.
#[derive(Default)]
pub struct Violations(Vec<String>);

impl Violations {
    /// Records `message` unless `ok`.
    pub fn check(&mut self, ok: bool, message: impl Into<String>) {
        if !ok {
            self.0.push(message.into());
        }
    }

    /// Records the error of a failed step.
    pub fn record(&mut self, message: impl Into<String>) {
        self.0.push(message.into());
    }

    /// Fails the test listing every recorded violation.
    pub fn assert_none(&self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} broken promise(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}
