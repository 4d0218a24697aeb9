//! Harness shared by the integration tests of vmsnap-core and of the `vmsnap`
//! binary: domain configs for the test guest, the `qemu-img`/`qemu-io` calls
//! the tests judge images with, the files a domain leaves behind, and a
//! runner for the `vmsnap` binary in a private state directory.
//!
//! These are test helpers: a setup step or an oracle call that fails panics
//! with a message naming the command and what it printed, because a test
//! must fail (never skip) when its harness cannot do its job.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{guest_initrd, guest_kernel, GUEST_KERNEL_CMDLINE};

/// One `[[disk]]` of a domain config.
#[derive(Debug, Clone, Copy)]
pub struct DiskDef<'a> {
    /// vda, vdb...
    pub target: &'a str,
    /// The image file as the config names it (relative names resolve against
    /// the config file's directory).
    pub file: &'a str,
    /// "qcow2" or "raw", as declared (never probed).
    pub format: &'a str,
}

impl<'a> DiskDef<'a> {
    /// A qcow2 disk.
    pub fn qcow2(target: &'a str, file: &'a str) -> Self {
        DiskDef {
            target,
            file,
            format: "qcow2",
        }
    }

    /// A raw disk.
    pub fn raw(target: &'a str, file: &'a str) -> Self {
        DiskDef {
            target,
            file,
            format: "raw",
        }
    }
}

/// The config of a domain that boots the test guest under TCG, with its
/// control channel on the unix socket `control_socket` and `extra_qemu_args`
/// appended to QEMU's arguments. Line numbers are stable (name on line 1,
/// the first disk's `format` on line 13), for tests that check the line an
/// error names.
pub fn guest_domain_toml(
    name: &str,
    memory_mib: u32,
    control_socket: &Path,
    extra_qemu_args: &[&str],
    disks: &[DiskDef<'_>],
) -> String {
    let extra: String = extra_qemu_args
        .iter()
        .map(|arg| format!(", \"{arg}\""))
        .collect();
    let mut config = format!(
        r#"name = "{name}"
memory_mib = {memory_mib}
vcpus = 1
accel = "tcg"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "{GUEST_KERNEL_CMDLINE}"
qemu_args = ["-no-reboot", "-chardev", "socket,id=ctl,path={ctl},server=on,wait=off", "-device", "isa-serial,chardev=ctl"{extra}]
"#,
        kernel = guest_kernel().expect("test guest built").display(),
        initrd = guest_initrd().expect("test guest built").display(),
        ctl = control_socket.display(),
    );
    push_disks(&mut config, disks);
    config
}

/// The config of a domain that is never started (SeaBIOS, no guest kernel):
/// for tests of what vmsnap does to a stopped domain's images.
pub fn stopped_domain_toml(name: &str, memory_mib: u32, disks: &[DiskDef<'_>]) -> String {
    let mut config = format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\naccel = \"tcg\"\nfirmware = \"/usr/share/seabios/bios.bin\"\n"
    );
    push_disks(&mut config, disks);
    config
}

fn push_disks(config: &mut String, disks: &[DiskDef<'_>]) {
    for disk in disks {
        config.push_str(&format!(
            "\n[[disk]]\ntarget = \"{}\"\nfile = \"{}\"\nformat = \"{}\"\n",
            disk.target, disk.file, disk.format
        ));
    }
}

/// Runs `qemu-img ARGS`, requires success and returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run_tool("qemu-img", args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates an empty qcow2 image of `size` (qemu-img's syntax, e.g. "32M").
pub fn create_qcow2(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "qcow2", utf8(path), size]);
}

/// Runs one `qemu-io` command on a qcow2 image, requires success and returns
/// its stdout (where qemu-io reports a failed pattern verification).
pub fn qemu_io(image: &Path, command: &str) -> String {
    let args = ["-f", "qcow2", "-c", command, utf8(image)];
    let out = run_tool("qemu-io", &args);
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check -U` of a qcow2 image (QEMU may hold it): Ok when it is
/// clean or only leaks clusters (allowed: repairable, and what a killed
/// operation may leave), Err with qemu-img's report otherwise.
pub fn qemu_img_check(image: &Path) -> Result<(), String> {
    let out = run_tool("qemu-img", &["check", "-U", "-f", "qcow2", utf8(image)]);
    match out.status.code() {
        Some(0) | Some(3) => Ok(()),
        code => Err(format!(
            "qemu-img check {} exited {code:?}: {}{}",
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Every file of `image`'s backing chain (`qemu-img info -U --backing-chain`),
/// top first, with the internal snapshots each holds: what crash tests
/// count as needed when they look for orphans.
pub fn backing_chain(image: &Path) -> Result<Vec<(PathBuf, Vec<String>)>, String> {
    let out = run_tool(
        "qemu-img",
        &[
            "info",
            "-U",
            "--backing-chain",
            "--output=json",
            utf8(image),
        ],
    );
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let chain: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(chain
        .as_array()
        .into_iter()
        .flatten()
        .map(|layer| {
            let tags = layer["snapshots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect();
            (
                PathBuf::from(layer["filename"].as_str().unwrap_or("")),
                tags,
            )
        })
        .collect())
}

/// Requires [`qemu_img_check`] to pass.
pub fn assert_qemu_img_check(image: &Path) {
    if let Err(report) = qemu_img_check(image) {
        panic!("{report}");
    }
}

/// Requires `qemu-img check` of a qcow2 image nothing holds open to find it
/// perfectly clean (exit 0: not even leaked clusters).
pub fn assert_qemu_img_check_clean(image: &Path, context: &str) {
    let out = run_tool("qemu-img", &["check", "-f", "qcow2", utf8(image)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{context}: {} does not check clean: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The entries of one directory, sorted; none when it does not exist (a
/// domain that never had a snapshot has no snapshots directory).
pub fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.expect("read a directory entry").path())
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    entries
}

/// Every file (not directory) below `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for path in dir_entries(dir) {
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// The pid in a domain's pid file under the state directory `state_dir`, if
/// it has one (the domain's QEMU runs, or ran and was not reaped).
pub fn qemu_pid(state_dir: &Path, domain: &str) -> Option<u32> {
    fs::read_to_string(state_dir.join("domains").join(domain).join("qemu.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// SIGKILLs the QEMU of `domain` if its pid file names one: how a test that
/// failed half-way still leaves no VM behind.
pub fn kill_qemu(state_dir: &Path, domain: &str) {
    if let Some(pid) = qemu_pid(state_dir, domain) {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Checks that `out` is a clean refusal of `vmsnap ARGS` and returns its one
/// line: a non-zero exit (not a death by signal), exactly one line on
/// stderr, starting with `error: `.
pub fn refusal(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "vmsnap {args:?} should have been refused, got {:?}; stdout {:?} stderr {stderr:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "vmsnap {args:?}: one-line error expected, got {stderr:?}"
    );
    assert!(stderr.starts_with("error: "), "vmsnap {args:?}: {stderr:?}");
    stderr.trim_end_matches('\n').to_string()
}

/// The `vmsnap` binary run in a test directory, with the state directory
/// `DIR/state` given through `VMSNAP_STATE_DIR`. The QEMU of every guarded
/// domain is killed when the runner is dropped, before the directory goes.
pub struct VmsnapCli {
    binary: PathBuf,
    guarded: RefCell<Vec<String>>,
    // Declared last: dropped (a TempDir deletes itself) after Drop killed QEMU.
    dir: Box<dyn AsRef<Path>>,
}

impl VmsnapCli {
    /// A runner of `binary` (a test's `env!("CARGO_BIN_EXE_vmsnap")`) in
    /// `dir`, which it keeps (e.g. a `tempfile::TempDir`) until dropped.
    pub fn new(binary: impl Into<PathBuf>, dir: impl AsRef<Path> + 'static) -> Self {
        VmsnapCli {
            binary: binary.into(),
            guarded: RefCell::new(Vec::new()),
            dir: Box::new(dir),
        }
    }

    /// A runner of `binary` in a new temporary directory named after
    /// `prefix`, removed when the runner is dropped.
    pub fn in_temp_dir(binary: impl Into<PathBuf>, prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        VmsnapCli::new(binary, dir)
    }

    /// The test directory.
    pub fn dir(&self) -> &Path {
        (*self.dir).as_ref()
    }

    /// A path inside the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The state directory vmsnap runs with.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// The guest control socket the configs of [`Self::write_guest_config`] name.
    pub fn control_socket(&self) -> PathBuf {
        self.path("ctl.sock")
    }

    /// Kills `domain`'s QEMU when the runner is dropped.
    pub fn guard(&self, domain: &str) {
        self.guarded.borrow_mut().push(domain.to_string());
    }

    /// The pid of `domain`'s QEMU, from its pid file.
    pub fn qemu_pid(&self, domain: &str) -> Option<u32> {
        qemu_pid(&self.state(), domain)
    }

    /// The vmsnap command with `args`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.env("VMSNAP_STATE_DIR", self.state()).args(args);
        command
    }

    /// Runs vmsnap with `args` and returns what it did.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_env(args, &[])
    }

    /// Runs vmsnap with `args` and extra environment variables (failpoints).
    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = self.command(args);
        for (key, value) in env {
            command.env(key, value);
        }
        command
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.binary.display()))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmsnap {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command that must be refused (see [`refusal`]); returns the line.
    pub fn refused(&self, args: &[&str]) -> String {
        refusal(args, &self.run(args))
    }

    /// Writes `NAME.toml` in the test directory: the test guest with
    /// `memory_mib` of RAM, its control channel on [`Self::control_socket`].
    pub fn write_guest_config(
        &self,
        name: &str,
        memory_mib: u32,
        disks: &[DiskDef<'_>],
    ) -> PathBuf {
        let config = guest_domain_toml(name, memory_mib, &self.control_socket(), &[], disks);
        let path = self.path(&format!("{name}.toml"));
        fs::write(&path, config).unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
        path
    }
}

impl Drop for VmsnapCli {
    fn drop(&mut self) {
        // Never leave a QEMU behind, whatever the test did.
        for domain in self.guarded.borrow().iter() {
            kill_qemu(&self.state(), domain);
        }
    }
}

fn run_tool(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed ({e}): run scripts/setup.sh"))
}

fn utf8(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}
