//! Crash safety of snapshot creation (DESIGN §5.4): vmsnap is SIGKILLed at
//! every step of an external memory+disk snapshot of a running guest (debug
//! builds honour `VMSNAP_FAILPOINTS`); the next `snapshot-list` recovers.
//! After each kill: the guest runs with its memory intact, the interrupted
//! snapshot is either fully there or not at all, no file is left that
//! nothing needs, every image checks clean, and the snapshot completed
//! before still reverts exactly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vmsnap_testguest::{guest_initrd, guest_kernel, Guest, GUEST_KERNEL_CMDLINE};

struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
        command
            .args(args)
            .env("VMSNAP_STATE_DIR", self.path("state"));
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, &[]);
        assert!(
            out.status.success(),
            "vmsnap {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn snapshot_files(&self) -> Vec<PathBuf> {
        let dir = self.path("state/domains/crashy/snapshots");
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .map(|entries| entries.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.run(&["destroy", "crashy"], &[]);
    }
}

fn check_clean(file: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-q", "-U", "-f", "qcow2", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn killed_at_every_step_of_an_external_snapshot() {
    let bench = Bench {
        dir: tempfile::Builder::new()
            .prefix("vmsnap-crash")
            .tempdir()
            .unwrap(),
    };
    let vda = bench.path("vda.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", vda.to_str().unwrap(), "32M"])
        .status()
        .unwrap();
    assert!(status.success());
    let ctl = bench.path("ctl.sock");
    fs::write(
        bench.path("crashy.toml"),
        format!(
            r#"name = "crashy"
memory_mib = 160
vcpus = 1
accel = "tcg"
kernel = "{}"
initrd = "{}"
cmdline = "{}"
qemu_args = ["-no-reboot", "-chardev", "socket,id=ctl,path={},server=on,wait=off", "-device", "isa-serial,chardev=ctl"]

[[disk]]
target = "vda"
file = "vda.qcow2"
format = "qcow2"
"#,
            guest_kernel().unwrap().display(),
            guest_initrd().unwrap().display(),
            GUEST_KERNEL_CMDLINE,
            ctl.display()
        ),
    )
    .unwrap();
    bench.ok(&["define", bench.path("crashy.toml").to_str().unwrap()]);
    bench.ok(&["start", "crashy"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    guest.write_pattern("vda", 0, 1 << 20, 0x77).unwrap();
    guest.set_ram_value("keep").unwrap();
    let keep_sum = guest.disk_checksum("vda", 0, 1 << 20).unwrap();
    bench.ok(&["snapshot-create-as", "crashy", "keep", "--external"]);

    // Learn the steps of the operation from a run that completes.
    let log = bench.path("steps.log");
    let out = bench.run(
        &["snapshot-create-as", "crashy", "probe", "--external"],
        &[("VMSNAP_FAILPOINT_LOG", log.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut steps: Vec<String> = Vec::new();
    for line in fs::read_to_string(&log).unwrap().lines() {
        if line.starts_with("snapshot.create.") && !steps.iter().any(|s| s == line) {
            steps.push(line.to_string());
        }
    }
    assert!(steps.len() >= 4, "too few steps: {steps:?}");
    bench.ok(&["snapshot-delete", "crashy", "probe"]);

    for (i, step) in steps.iter().enumerate() {
        let name = format!("crash{i}");
        let value = format!("value-{i}");
        guest.set_ram_value(&value).unwrap();
        let out = bench.run(
            &["snapshot-create-as", "crashy", &name, "--external"],
            &[("VMSNAP_FAILPOINTS", step.as_str())],
        );
        assert_eq!(
            out.status.code(),
            None,
            "vmsnap should have been killed at {step}"
        );
        let listed = bench.ok(&["snapshot-list", "crashy", "--name"]);
        let names: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
        assert!(names.contains(&"keep"), "after {step}: {names:?}");
        let recorded = names.contains(&name.as_str());
        assert_eq!(
            recorded,
            step.ends_with("committed"),
            "after {step}: {names:?}"
        );
        // The guest runs on, memory intact.
        assert!(bench.ok(&["list"]).contains("running"), "after {step}");
        assert_eq!(guest.ram_value().unwrap(), value, "after {step}");
        // Only files something needs remain, and they check clean.
        // (A kill after the disks switched leaves the guest on the new
        // overlay, with no snapshot recorded: the layers stay in its chain.)
        let nodes: serde_json::Value =
            serde_json::from_str(&bench.ok(&["qmp", "crashy", "query-named-block-nodes"])).unwrap();
        let open: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["file"].as_str().map(str::to_string))
            .collect();
        for file in bench.snapshot_files() {
            let stem = file.file_name().unwrap().to_string_lossy().to_string();
            let owner_listed = names
                .iter()
                .any(|n| stem.contains(&format!(".{n}.")) || stem.starts_with(&format!("{n}.")));
            let in_chain = open.contains(&file.display().to_string());
            assert!(
                owner_listed || in_chain,
                "after {step}: orphan {}",
                file.display()
            );
            if stem.ends_with(".qcow2") {
                check_clean(&file);
            }
        }
        if recorded {
            bench.ok(&["snapshot-delete", "crashy", &name]);
        }
    }
    assert!(bench.ok(&["snapshot-list", "crashy", "--name"]).trim() == "keep");

    // The snapshot completed before all this still reverts exactly.
    drop(guest);
    bench.ok(&["snapshot-revert", "crashy", "keep"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "keep");
    assert_eq!(guest.disk_checksum("vda", 0, 1 << 20).unwrap(), keep_sum);
}
