//! `qemu-img` and `qemu-io` (QEMU 7.2) as the oracle: what our engine writes they must
//! check clean and read back identically.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs a QEMU tool, failing the test (never skipping it) when the tool is missing.
///
/// QEMU's image locks are open-file-description locks: while another test thread's child
/// is between fork and exec it briefly shares the descriptors our engine had open, so a
/// lock can outlive our `drop` by a moment. Lock conflicts are retried for up to 2 s; a
/// lock our engine really kept still fails the test.
fn run_tool(tool: &str, args: &[&str]) -> Output {
    for _ in 0..40 {
        let output = spawn_tool(tool, args);
        let lock_conflict = !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("Failed to get");
        if !lock_conflict {
            return output;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    spawn_tool(tool, args)
}

fn spawn_tool(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed: these tests use QEMU 7.2's {tool} as their oracle; \
             run scripts/setup.sh first"
        ),
        Err(err) => panic!("cannot run {tool}: {err}"),
    }
}

fn describe(tool: &str, args: &[&str], output: &Output) -> String {
    format!(
        "{tool} {} exited with {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `qemu-img` and returns its output whatever its exit status.
pub fn qemu_img(args: &[&str]) -> Output {
    run_tool("qemu-img", args)
}

/// Runs `qemu-img`, requires success and returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let output = qemu_img(args);
    assert!(
        output.status.success(),
        "{}",
        describe("qemu-img", args, &output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `qemu-io` commands on a qcow2 image (format given, never probed), requiring success.
pub fn qemu_io(path: &Path, commands: &[&str]) {
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec!["-f", "qcow2"];
    for command in commands {
        args.push("-c");
        args.push(command);
    }
    args.push(path);
    let output = run_tool("qemu-io", &args);
    // qemu-io exits 0 even when a command fails; it reports failures on stdout/stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && !text.contains("failed") && !text.contains("error"),
        "{}",
        describe("qemu-io", &args, &output)
    );
}

/// Creates a qcow2 image with `qemu-img create -o OPTIONS`.
pub fn qemu_create(path: &Path, size: u64, options: &str) {
    let size = size.to_string();
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.push("-o");
        args.push(options);
    }
    args.push(path);
    args.push(&size);
    qemu_img_ok(&args);
}

/// Creates a qcow2 overlay with `qemu-img create -b BACKING -F BACKING_FORMAT`, adding
/// `options` (such as `-u` for a backing file that need not exist, or `-o …`) and the
/// size when one is given (without one the overlay takes the backing file's size).
pub fn qemu_create_overlay(
    path: &Path,
    backing: &str,
    backing_format: &str,
    options: &[&str],
    size: Option<&str>,
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.extend(["-b", backing, "-F", backing_format]);
    args.push(path.to_str().expect("utf-8 path"));
    args.extend(size);
    qemu_img_ok(&args);
}

/// Converts a raw file into a qcow2 image of compressed clusters with
/// `qemu-img convert -c -o OPTIONS`.
pub fn qemu_convert_compressed(raw: &Path, qcow2: &Path, options: &str) {
    let raw = raw.to_str().expect("utf-8 path");
    let qcow2 = qcow2.to_str().expect("utf-8 path");
    qemu_img_ok(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, raw, qcow2,
    ]);
}

/// What `qemu-img check --output=json` said, with its exit status
/// (0 clean, 1 check failed, 2 corruptions, 3 leaks only).
#[derive(Debug)]
pub struct QemuCheck {
    pub exit_code: i32,
    pub json: Value,
    pub stderr: String,
}

impl QemuCheck {
    /// A counter from the JSON report (qemu-img omits zero `leaks`/`corruptions`).
    pub fn count(&self, field: &str) -> u64 {
        self.json.get(field).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// Runs `qemu-img check --output=json` on a qcow2 image.
pub fn qemu_check(path: &Path) -> QemuCheck {
    let path = path.to_str().expect("utf-8 path");
    let args = ["check", "-f", "qcow2", "--output=json", path];
    let output = qemu_img(&args);
    let exit_code = output.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    QemuCheck {
        exit_code,
        json,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Requires `qemu-img check` to find no errors, no corruptions and no leaks.
pub fn assert_qemu_check_clean(path: &Path, context: &str) {
    let check = qemu_check(path);
    assert!(
        check.exit_code == 0
            && check.count("check-errors") == 0
            && check.count("corruptions") == 0
            && check.count("leaks") == 0
            && check.count("corruptions-fixed") == 0,
        "{context}: qemu-img check on {} is not clean (exit {}): {}\n{}",
        path.display(),
        check.exit_code,
        check.json,
        check.stderr
    );
}

/// `qemu-img info --output=json` (format given, never probed).
pub fn qemu_info(path: &Path) -> Value {
    let path = path.to_str().expect("utf-8 path");
    let out = qemu_img_ok(&["info", "-f", "qcow2", "--output=json", path]);
    serde_json::from_str(&out).expect("qemu-img info prints JSON")
}

/// One snapshot as `qemu-img info --output=json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSnapshot {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u64,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

/// The snapshot table as QEMU reads it, in table order.
pub fn qemu_snapshots(path: &Path) -> Vec<QemuSnapshot> {
    let info = qemu_info(path);
    let Some(list) = info.get("snapshots").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .map(|s| {
            let number = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            QemuSnapshot {
                id: s["id"].as_str().expect("snapshot id").to_string(),
                name: s["name"].as_str().expect("snapshot name").to_string(),
                vm_state_size: number("vm-state-size"),
                date_sec: number("date-sec"),
                date_nsec: number("date-nsec"),
                vm_clock_nsec: number("vm-clock-sec") * 1_000_000_000 + number("vm-clock-nsec"),
                icount: s.get("icount").and_then(Value::as_u64),
            }
        })
        .collect()
}

/// The snapshot names QEMU reads, in table order.
pub fn qemu_snapshot_names(path: &Path) -> Vec<String> {
    qemu_snapshots(path).into_iter().map(|s| s.name).collect()
}

/// `qemu-img snapshot -l` as (id, tag) pairs, parsed from its table (tags without spaces).
pub fn qemu_snapshot_list_text(path: &Path) -> Vec<(String, String)> {
    // qemu-img 7.2's snapshot command has no -f; these test images are all qcow2.
    let out = qemu_img_ok(&["snapshot", "-l", path.to_str().expect("utf-8 path")]);
    out.lines()
        .skip_while(|line| !line.starts_with("ID"))
        .skip(1)
        .filter_map(|line| {
            let mut columns = line.split_whitespace();
            Some((columns.next()?.to_string(), columns.next()?.to_string()))
        })
        .collect()
}

/// The guest-visible bytes of an image (its active state, or one internal snapshot) as
/// `qemu-img convert -O raw` produces them, following the backing chain QEMU follows.
pub fn qemu_read_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let selector = snapshot.map(|name| format!("snapshot.name={name}"));
    let mut input = vec!["-f", "qcow2"];
    if let Some(selector) = &selector {
        input.push("-l");
        input.push(selector);
    }
    convert_to_raw(path, &input)
}

/// Same as [`qemu_read_raw`] for an image whose format is not qcow2 (e.g. a raw base).
pub fn qemu_read_raw_format(path: &Path, format: &str) -> Vec<u8> {
    convert_to_raw(path, &["-f", format])
}

/// `qemu-img convert INPUT… -O raw` of `path` into a temporary file; returns its bytes.
fn convert_to_raw(path: &Path, input: &[&str]) -> Vec<u8> {
    let out = tempfile::Builder::new()
        .prefix("vmsnap-oracle-")
        .suffix(".raw")
        .tempfile()
        .expect("temporary raw file");
    let out_path = out.path().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["convert"];
    args.extend_from_slice(input);
    args.extend(["-O", "raw", path.to_str().expect("utf-8 path"), &out_path]);
    qemu_img_ok(&args);
    super::read_file(out.path())
}
