//! `vmsnap img …` end to end: the binary run with qemu-img's flags, judged by qemu-img
//! 7.2 itself: images it creates check clean, `--output json` uses qemu-img's field
//! names and values, exit codes follow qemu-img's (check: 0 clean, 2 corrupt, 3 leaks),
//! and refusals are one line on stderr with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const MIB: u64 = 1024 * 1024;

fn vmsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("img")
        .args(args)
        .output()
        .expect("run the vmsnap binary")
}

fn describe(what: &str, args: &[&str], out: &Output) -> String {
    format!(
        "{what} {} -> {}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `vmsnap img ARGS`, requires exit 0, returns stdout.
fn vmsnap_ok(args: &[&str]) -> String {
    let out = vmsnap(args);
    assert!(
        out.status.success(),
        "{}",
        describe("vmsnap img", args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `vmsnap img ARGS` expecting a refusal: non-zero exit, one line on stderr that
/// names `subject`, no panic.
fn vmsnap_refused(args: &[&str], subject: &str) -> Output {
    let out = vmsnap(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a refusal: {}",
        describe("vmsnap img", args, &out)
    );
    assert!(!stderr.contains("panicked"), "vmsnap panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one-line error expected, got: {stderr:?}"
    );
    assert!(
        stderr.contains(subject),
        "error does not name {subject}: {stderr:?}"
    );
    out
}

fn qemu_img(args: &[&str]) -> Output {
    match Command::new("qemu-img").args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("qemu-img is needed as the oracle ({e}): run scripts/setup.sh"),
    }
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(out.status.success(), "{}", describe("qemu-img", args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(path: &Path, command: &str) {
    let out = match Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command, path.to_str().unwrap()])
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!("qemu-io is needed as the oracle ({e}): run scripts/setup.sh"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {command}: {text}"
    );
}

fn qemu_info(path: &Path) -> Value {
    let out = qemu_img_ok(&[
        "info",
        "-f",
        "qcow2",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    serde_json::from_str(&out).expect("qemu-img info JSON")
}

fn qemu_check(path: &Path) -> (i32, Value) {
    let out = qemu_img(&[
        "check",
        "-f",
        "qcow2",
        "--output=json",
        path.to_str().unwrap(),
    ]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json)
}

fn assert_qemu_clean(path: &Path, what: &str) {
    let (code, json) = qemu_check(path);
    assert_eq!(code, 0, "{what}: qemu-img check not clean: {json}");
}

fn qemu_read(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let selector = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-f", "qcow2"];
    if let Some(sel) = &selector {
        args.extend(["-l", sel.as_str()]);
    }
    let dst = out.path().to_str().unwrap().to_string();
    args.extend(["-O", "raw", path.to_str().unwrap(), &dst]);
    qemu_img_ok(&args);
    std::fs::read(out.path()).unwrap()
}

/// `qemu-img create -q -f qcow2 OPTIONS… DIR/NAME SIZE`; returns the image's path.
fn qemu_image(dir: &Path, name: &str, size: &str, options: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.extend([s(&path), size]);
    qemu_img_ok(&args);
    path
}

/// An overlay made by qemu-img over a 1 MiB raw file of zeros, `base.raw` in `dir`.
fn qemu_overlay_over_raw(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; MIB as usize]).unwrap();
    let overlay = dir.join("overlay.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&overlay),
    ]);
    overlay
}

/// Runs `vmsnap img ARGS` and requires exit status `code`.
fn vmsnap_exits(args: &[&str], code: i32, what: &str) -> Output {
    let out = vmsnap(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: {}",
        describe("vmsnap img", args, &out)
    );
    out
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmsnap-cli-img-")
        .tempdir()
        .unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Every key the two JSON objects share must hold the same value (recursively), and
/// `required` keys must be present in ours.
fn assert_json_agrees(ours: &Value, qemu: &Value, required: &[&str], what: &str) {
    for key in required {
        assert!(
            ours.get(key).is_some(),
            "{what}: our JSON lacks qemu-img's {key:?}: {ours}"
        );
    }
    compare_overlap(ours, qemu, what, "");
}

fn compare_overlap(ours: &Value, qemu: &Value, what: &str, at: &str) {
    match (ours, qemu) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                if let Some(theirs) = b.get(key) {
                    compare_overlap(value, theirs, what, &format!("{at}.{key}"));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{what}: array {at} length");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare_overlap(x, y, what, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(ours, qemu, "{what}: value of {at} differs from qemu-img's"),
    }
}

#[test]
fn create_qcow2_with_qemu_img_flags() {
    let dir = tmp();
    for (options, cluster, compat) in [
        ("cluster_size=4096", 4096, "1.1"),
        ("cluster_size=65536,compat=0.10", 65536, "0.10"),
        ("cluster_size=2M,refcount_bits=64", 2 * MIB, "1.1"),
        ("cluster_size=512", 512, "1.1"),
    ] {
        let path = dir.path().join(format!("c{cluster}-{compat}.qcow2"));
        vmsnap_ok(&["create", "-f", "qcow2", "-o", options, s(&path), "64M"]);
        let info = qemu_info(&path);
        assert_eq!(info["virtual-size"].as_u64(), Some(64 * MIB), "{options}");
        assert_eq!(info["cluster-size"].as_u64(), Some(cluster), "{options}");
        assert_eq!(
            info["format-specific"]["data"]["compat"], compat,
            "{options}"
        );
        assert_qemu_clean(&path, options);
    }
    let with_bits = dir.path().join("c2097152-1.1.qcow2");
    assert_eq!(
        qemu_info(&with_bits)["format-specific"]["data"]["refcount-bits"],
        64
    );
}

#[test]
fn create_raw_has_the_exact_size() {
    let dir = tmp();
    let path = dir.path().join("disk.raw");
    vmsnap_ok(&["create", "-f", "raw", s(&path), "3M"]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);
}

#[test]
fn create_overlay_with_backing_and_format() {
    let dir = tmp();
    let base = qemu_image(dir.path(), "base.qcow2", "8M", &[]);
    qemu_io(&base, "write -P 0x5a 1M 64k");
    let overlay = dir.path().join("overlay.qcow2");
    // No size: the overlay takes the backing file's, as with qemu-img.
    vmsnap_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    let info = qemu_info(&overlay);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(8 * MIB));
    assert_eq!(
        qemu_read(&overlay, None),
        qemu_read(&base, None),
        "reads fall through"
    );
}

#[test]
fn create_refuses_backing_without_format() {
    let dir = tmp();
    let base = qemu_image(dir.path(), "base.qcow2", "8M", &[]);
    let overlay = dir.path().join("overlay.qcow2");
    let out = vmsnap(&["create", "-f", "qcow2", "-b", s(&base), s(&overlay)]);
    assert!(
        !out.status.success(),
        "a backing file without -F must be refused (never probed)"
    );
    assert!(!overlay.exists(), "a refused create left a file behind");
}

/// A qemu-made image with data and snapshots, to compare our JSON with qemu-img's.
fn image_with_snapshots(dir: &Path) -> PathBuf {
    let path = qemu_image(dir, "snaps.qcow2", "16M", &["-o", "cluster_size=65536"]);
    qemu_io(&path, "write -P 0x11 0 1M");
    qemu_img_ok(&["snapshot", "-c", "first", s(&path)]);
    qemu_io(&path, "write -P 0x22 512k 1M");
    qemu_img_ok(&["snapshot", "-c", "second", s(&path)]);
    path
}

#[test]
fn info_json_matches_qemu_img() {
    let dir = tmp();
    let path = image_with_snapshots(dir.path());
    let ours: Value = serde_json::from_str(&vmsnap_ok(&["info", "--output", "json", s(&path)]))
        .expect("info --output json prints JSON");
    let qemu = qemu_info(&path);
    assert_json_agrees(
        &ours,
        &qemu,
        &[
            "virtual-size",
            "filename",
            "format",
            "cluster-size",
            "actual-size",
            "snapshots",
            "format-specific",
            "dirty-flag",
        ],
        "info --output json",
    );
    // The `=` spelling qemu-img users type works too.
    let again: Value =
        serde_json::from_str(&vmsnap_ok(&["info", "--output=json", s(&path)])).unwrap();
    assert_eq!(again["virtual-size"], ours["virtual-size"]);

    let overlay = qemu_overlay_over_raw(dir.path());
    let ours: Value =
        serde_json::from_str(&vmsnap_ok(&["info", "--output", "json", s(&overlay)])).unwrap();
    assert_json_agrees(
        &ours,
        &qemu_info(&overlay),
        &["backing-filename", "backing-filename-format"],
        "overlay info",
    );
}

#[test]
fn snapshot_list_json_matches_qemu_img() {
    let dir = tmp();
    let path = image_with_snapshots(dir.path());
    let ours: Value = serde_json::from_str(&vmsnap_ok(&[
        "snapshot",
        "-l",
        "--output",
        "json",
        s(&path),
    ]))
    .expect("snapshot -l --output json prints JSON");
    let ours = ours.get("snapshots").cloned().unwrap_or(ours);
    let qemu = qemu_info(&path)["snapshots"].clone();
    let list = ours.as_array().expect("a list of snapshots");
    assert_eq!(list.len(), 2);
    for entry in list {
        for key in [
            "id",
            "name",
            "vm-state-size",
            "date-sec",
            "date-nsec",
            "vm-clock-sec",
            "vm-clock-nsec",
        ] {
            assert!(
                entry.get(key).is_some(),
                "snapshot entry lacks qemu-img's {key:?}: {entry}"
            );
        }
    }
    compare_overlap(&ours, &qemu, "snapshot -l --output json", "");
    let text = vmsnap_ok(&["snapshot", "-l", s(&path)]);
    assert!(
        text.contains("first") && text.contains("second"),
        "table lists both: {text}"
    );
}

#[test]
fn snapshot_create_apply_delete() {
    let dir = tmp();
    let path = dir.path().join("disk.qcow2");
    vmsnap_ok(&["create", "-f", "qcow2", s(&path), "4M"]);
    qemu_io(&path, "write -P 0x31 0 128k");
    let first = qemu_read(&path, None);
    vmsnap_ok(&["snapshot", "-c", "one", s(&path)]);
    qemu_io(&path, "write -P 0x32 64k 128k");
    vmsnap_ok(&["snapshot", "-c", "two", s(&path)]);
    let second = qemu_read(&path, None);
    let names: Vec<String> = qemu_info(&path)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["one", "two"]);
    vmsnap_ok(&["snapshot", "-a", "one", s(&path)]);
    assert_eq!(qemu_read(&path, None), first, "apply one");
    vmsnap_ok(&["snapshot", "-d", "one", s(&path)]);
    assert_qemu_clean(&path, "after delete");
    assert_eq!(
        qemu_read(&path, Some("two")),
        second,
        "two survives deleting one"
    );
    vmsnap_ok(&["snapshot", "-a", "two", s(&path)]);
    assert_eq!(qemu_read(&path, None), second, "apply two");
    assert_qemu_clean(&path, "end");
}

#[test]
fn snapshot_refusals_change_nothing() {
    let dir = tmp();
    let path = image_with_snapshots(dir.path());
    let before = std::fs::read(&path).unwrap();
    vmsnap_refused(
        &["snapshot", "-a", "no-such-snapshot", s(&path)],
        "no-such-snapshot",
    );
    vmsnap_refused(
        &["snapshot", "-d", "no-such-snapshot", s(&path)],
        "no-such-snapshot",
    );
    assert!(
        before == std::fs::read(&path).unwrap(),
        "a refused snapshot command wrote"
    );
}

/// Sets the refcount of host cluster `index` in refcount block 0 (16-bit refcounts).
fn poke_refcount16(path: &Path, index: u64, value: u16) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(48)).unwrap();
    f.read_exact(&mut b).unwrap();
    let table = u64::from_be_bytes(b);
    f.seek(SeekFrom::Start(table)).unwrap();
    f.read_exact(&mut b).unwrap();
    let block = u64::from_be_bytes(b);
    f.seek(SeekFrom::Start(block + index * 2)).unwrap();
    f.write_all(&value.to_be_bytes()).unwrap();
}

#[test]
fn check_exit_codes_json_and_repair() {
    let dir = tmp();
    let path = qemu_image(dir.path(), "disk.qcow2", "4M", &["-o", "cluster_size=4096"]);
    qemu_io(&path, "write -P 0x41 0 64k");

    vmsnap_exits(&["check", s(&path)], 0, "clean image");

    // Leak: a cluster appended to the file with refcount 1 and no reference. A fresh
    // 4 KiB-cluster image holds the header, refcount table, refcount block, L1 and L2 in
    // clusters 0-4 and the 64 KiB written in clusters 5-20.
    let leaky = dir.path().join("leaky.qcow2");
    std::fs::copy(&path, &leaky).unwrap();
    let file_clusters = std::fs::metadata(&leaky).unwrap().len().div_ceil(4096);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leaky)
        .unwrap()
        .set_len((file_clusters + 1) * 4096)
        .unwrap();
    poke_refcount16(&leaky, file_clusters, 1);
    let data_cluster = 6;
    let (qemu_code, qemu_json) = qemu_check(&leaky);
    assert_eq!(qemu_code, 3, "poke made a leak: {qemu_json}");
    let out = vmsnap_exits(&["check", "--output", "json", s(&leaky)], 3, "leaks exit 3");
    let ours: Value = serde_json::from_slice(&out.stdout).expect("check --output json");
    assert_json_agrees(
        &ours,
        &qemu_json,
        &[
            "check-errors",
            "leaks",
            "image-end-offset",
            "total-clusters",
            "filename",
            "format",
        ],
        "check --output json",
    );
    vmsnap_exits(&["check", "-r", "leaks", s(&leaky)], 0, "repaired");
    assert_qemu_clean(&leaky, "after vmsnap img check -r leaks");

    // Corruption: a used cluster's refcount set to 0.
    let broken = dir.path().join("broken.qcow2");
    std::fs::copy(&path, &broken).unwrap();
    poke_refcount16(&broken, data_cluster, 0);
    let (qemu_code, qemu_json) = qemu_check(&broken);
    assert_eq!(qemu_code, 2, "poke made a corruption: {qemu_json}");
    let out = vmsnap_exits(
        &["check", "--output", "json", s(&broken)],
        2,
        "corruption exits 2",
    );
    let ours: Value = serde_json::from_slice(&out.stdout).expect("check --output json");
    assert_json_agrees(
        &ours,
        &qemu_json,
        &["check-errors", "corruptions"],
        "check of a corrupt image",
    );
    vmsnap_exits(&["check", "-r", "all", s(&broken)], 0, "repaired");
    assert_qemu_clean(&broken, "after vmsnap img check -r all");
    assert_eq!(
        qemu_read(&broken, None),
        qemu_read(&path, None),
        "repair kept the data"
    );
}

#[test]
fn commit_and_rebase() {
    let dir = tmp();
    let base = qemu_image(dir.path(), "base.qcow2", "4M", &[]);
    qemu_io(&base, "write -P 0x61 0 2M");
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![0x62u8; 4 * MIB as usize]).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    vmsnap_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    qemu_io(&overlay, "write -P 0x63 1M 64k");
    let view = qemu_read(&overlay, None);

    // Safe rebase onto a different backing file keeps the guest view.
    vmsnap_ok(&["rebase", "-b", "other.raw", "-F", "raw", s(&overlay)]);
    let info = qemu_info(&overlay);
    assert_eq!(info["backing-filename"], "other.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(
        qemu_read(&overlay, None),
        view,
        "safe rebase keeps the view"
    );
    assert_qemu_clean(&overlay, "after safe rebase");

    // Unsafe rebase back only rewrites the header.
    vmsnap_ok(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    assert_eq!(qemu_info(&overlay)["backing-filename"], "base.qcow2");
    assert_qemu_clean(&overlay, "after rebase -u");

    // Commit the overlay into base.qcow2; base now shows the overlay's view.
    let expected = qemu_read(&overlay, None);
    vmsnap_ok(&["commit", s(&overlay)]);
    assert_eq!(qemu_read(&base, None), expected, "base after commit");
    assert_qemu_clean(&base, "base after commit");
}

#[test]
fn refusals_are_one_line_and_change_nothing() {
    let dir = tmp();
    let missing = dir.path().join("missing.qcow2");
    vmsnap_refused(&["info", s(&missing)], "missing.qcow2");
    vmsnap_refused(&["check", s(&missing)], "missing.qcow2");

    // A qcow2 file with a bad magic: every command refuses it by name.
    let bad = qemu_image(dir.path(), "badmagic.qcow2", "4M", &[]);
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[..4].copy_from_slice(b"QFIX");
    std::fs::write(&bad, &bytes).unwrap();
    for args in [
        vec!["info", "-f", "qcow2", s(&bad)],
        vec!["check", "-f", "qcow2", s(&bad)],
        vec!["snapshot", "-l", "-f", "qcow2", s(&bad)],
        vec!["snapshot", "-c", "x", "-f", "qcow2", s(&bad)],
    ] {
        vmsnap_refused(&args, "badmagic.qcow2");
    }
    assert!(
        bytes == std::fs::read(&bad).unwrap(),
        "a refused command wrote to the image"
    );

    // Huge nb_snapshots: refused without trying to allocate for them.
    let huge = qemu_image(dir.path(), "huge.qcow2", "4M", &[]);
    let mut bytes = std::fs::read(&huge).unwrap();
    bytes[60..64].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
    std::fs::write(&huge, &bytes).unwrap();
    vmsnap_refused(&["snapshot", "-l", s(&huge)], "huge.qcow2");
    let out = vmsnap(&["check", s(&huge)]);
    assert!(!out.status.success(), "check of an unreadable image fails");
    assert!(
        bytes == std::fs::read(&huge).unwrap(),
        "a refused command wrote to the image"
    );
}

/// Writes `bytes` at `offset` of a file.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Header damage in the spirit of QEMU's iotest 080: every image command refuses the
/// image with a one-line error naming it, exits non-zero, and writes nothing.
#[test]
fn corrupt_headers_are_refused_by_every_command() {
    let dir = tmp();
    let cases: [(&str, u64, &[u8]); 9] = [
        ("wrong magic", 0, b"QFIX"),
        ("huge l1_size", 36, &[0xff, 0xff, 0xff, 0xff]),
        (
            "misaligned L1 table",
            40,
            &[0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd, 0xef],
        ),
        (
            "misaligned refcount table",
            48,
            &[0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd, 0xef],
        ),
        ("huge refcount table", 56, &[0xff, 0xff, 0xff, 0xff]),
        ("huge nb_snapshots", 60, &[0x7f, 0xff, 0xff, 0xff]),
        (
            "snapshot table past EOF",
            64,
            &[0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0],
        ),
        (
            "unknown incompatible feature",
            72,
            &[0, 0, 1, 0, 0, 0, 0, 0],
        ),
        ("cluster_bits 30", 20, &[0, 0, 0, 30]),
    ];
    for (index, (what, offset, bytes)) in cases.iter().enumerate() {
        let name = format!("case{index}.qcow2");
        let path = qemu_image(dir.path(), &name, "4M", &[]);
        qemu_io(&path, "write -P 0x71 0 4k");
        qemu_img_ok(&["snapshot", "-c", "keep", s(&path)]);
        if *what == "snapshot table past EOF" {
            poke(&path, 60, &[0, 0, 0, 2]);
        }
        poke(&path, *offset, bytes);
        let before = std::fs::read(&path).unwrap();
        // -f qcow2 as a user would give it: without it a file with no qcow2 magic is raw.
        for args in [
            vec!["info", "-f", "qcow2", s(&path)],
            vec!["snapshot", "-l", "-f", "qcow2", s(&path)],
            vec!["snapshot", "-c", "new", "-f", "qcow2", s(&path)],
            vec!["snapshot", "-a", "keep", "-f", "qcow2", s(&path)],
            vec!["snapshot", "-d", "keep", "-f", "qcow2", s(&path)],
        ] {
            vmsnap_refused(&args, &name);
        }
        let out = vmsnap(&["check", s(&path)]);
        assert!(
            !out.status.success(),
            "{what}: check of an unopenable image exits non-zero"
        );
        assert!(
            before == std::fs::read(&path).unwrap(),
            "{what}: a refused command wrote"
        );
    }
}

/// QEMU marks images it found corrupt; we must not write to one.
#[test]
fn corrupt_bit_refuses_writes() {
    let dir = tmp();
    let path = qemu_image(dir.path(), "marked.qcow2", "4M", &[]);
    qemu_img_ok(&["snapshot", "-c", "keep", s(&path)]);
    poke(&path, 79, &[2]); // incompatible feature bit 1: corrupt
    let before = std::fs::read(&path).unwrap();
    vmsnap_refused(&["snapshot", "-c", "new", s(&path)], "marked.qcow2");
    vmsnap_refused(&["snapshot", "-d", "keep", s(&path)], "marked.qcow2");
    assert!(
        before == std::fs::read(&path).unwrap(),
        "a refused command wrote"
    );
}

/// Muscle memory extends to reading the output: on the same images, the text of
/// `info`, `check` and `snapshot -l` is qemu-img's, line for line.
#[test]
fn text_output_matches_qemu_img() {
    let dir = tmp();
    let snaps = image_with_snapshots(dir.path());
    let overlay = qemu_overlay_over_raw(dir.path());
    let v2 = qemu_image(
        dir.path(),
        "v2.qcow2",
        "3M",
        &["-o", "compat=0.10,cluster_size=4096"],
    );
    qemu_io(&v2, "write -P 0x11 0 100k");
    for path in [&snaps, &overlay, &v2] {
        for command in [vec!["info"], vec!["check"], vec!["snapshot", "-l"]] {
            let mut args = command.clone();
            args.push(s(path));
            let ours = vmsnap(&args);
            let theirs = qemu_img(&args);
            assert_eq!(ours.status.code(), theirs.status.code(), "exit of {args:?}");
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "stdout of `img {}`",
                args.join(" ")
            );
        }
    }
}

/// `-f raw` is obeyed even when the file looks like qcow2 (a raw disk whose guest wrote
/// a qcow2 header is still raw), as qemu-img obeys it.
#[test]
fn format_flag_is_obeyed_not_guessed() {
    let dir = tmp();
    let path = qemu_image(dir.path(), "looks-like-qcow2.img", "4M", &[]);
    let ours: Value = serde_json::from_str(&vmsnap_ok(&[
        "info",
        "-f",
        "raw",
        "--output",
        "json",
        s(&path),
    ]))
    .unwrap();
    assert_eq!(ours["format"], "raw");
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        ours["virtual-size"].as_u64(),
        Some(size),
        "raw size is the file size"
    );
    let before = std::fs::read(&path).unwrap();
    let out = vmsnap(&["snapshot", "-c", "x", "-f", "raw", s(&path)]);
    assert!(
        !out.status.success(),
        "internal snapshots of a raw image are refused"
    );
    assert!(
        before == std::fs::read(&path).unwrap(),
        "the refused snapshot wrote"
    );
}
