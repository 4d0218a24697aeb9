//! Snapshot orchestration against real QEMU 7.2 and the test guest (TCG):
//! virsh's fan-out tree (create s1, s3, s2; revert s3; create s6, s5; revert
//! s6; create s4; revert s1; create s7, s8) with internal, external,
//! disk-only and mixed snapshots. At every snapshot the guest's disk
//! checksums and RAM value are recorded; after every revert they must match
//! exactly (DESIGN §5.1, §5.2). A disk-only snapshot holds no RAM: reverting
//! to it boots the guest afresh from the disks, which must match exactly.
//! Then every snapshot is deleted and the images must be back to about the
//! current state's size with `qemu-img check` clean (§5.3).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmsnap_core::snapshot::orchestrate::{
    CreateRequest, DiskSpec, Orchestrator, Progress, RevertMode,
};
use vmsnap_core::snapshot::render::render_tree;
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::snapshot::{DiskSnapshotMode, SnapshotKind};
use vmsnap_core::{Host, LaunchOptions, LockWait, QemuProcess};
use vmsnap_testguest::lab::{self, DiskDef};
use vmsnap_testguest::Guest;

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest region the test writes to and checks, per disk.
const REGION: u64 = 2 << 20;

fn no_progress(_: Progress<'_>) {}

/// A temporary state directory with one running test-guest domain.
struct Bench {
    dir: tempfile::TempDir,
    host: Host,
    name: String,
    disks: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Capture {
    sums: BTreeMap<String, String>,
    ram: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Internal,
    External,
    /// Disks alone, inside the qcow2 images (one QMP transaction).
    InternalDiskOnly,
    /// Disks alone, onto new overlays (one QMP transaction).
    ExternalDiskOnly,
}

impl Kind {
    fn disk_only(self) -> bool {
        matches!(self, Kind::InternalDiskOnly | Kind::ExternalDiskOnly)
    }
}

impl Bench {
    /// Defines a domain with a qcow2 vda and, if `raw_vdb`, a raw vdb.
    fn new(name: &str, raw_vdb: bool) -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-snap")
            .tempdir()
            .unwrap();
        let host = Host::open(Some(&dir.path().join("state"))).unwrap();
        let path = |f: &str| dir.path().join(f);
        lab::create_qcow2(&path("vda.qcow2"), "32M");
        let mut disks = vec!["vda"];
        let mut disk_defs = vec![DiskDef::qcow2("vda", "vda.qcow2")];
        if raw_vdb {
            fs::write(path("vdb.raw"), vec![0u8; 8 << 20]).unwrap();
            disk_defs.push(DiskDef::raw("vdb", "vdb.raw"));
            disks.push("vdb");
        }
        let config = lab::guest_domain_toml(name, 192, &path("ctl.sock"), &[], &disk_defs);
        fs::write(path("dom.toml"), config).unwrap();
        host.define(&path("dom.toml"), LockWait::Fail).unwrap();
        Bench {
            dir,
            host,
            name: name.to_string(),
            disks,
        }
    }

    fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn orchestrator(&self) -> Orchestrator<'_> {
        Orchestrator::new(&self.host).unwrap()
    }

    async fn start(&self) -> Guest {
        let (lock, domain) = self.host.lock(&self.name, LockWait::Fail).unwrap();
        domain
            .start(self.host.store(), &lock, LaunchOptions::default())
            .await
            .unwrap();
        drop(lock);
        Guest::connect(self.ctl(), GUEST_TIMEOUT).unwrap()
    }

    fn capture(&self, guest: &mut Guest) -> Capture {
        let sums = self
            .disks
            .iter()
            .map(|d| (d.to_string(), guest.disk_checksum(d, 0, REGION).unwrap()))
            .collect();
        Capture {
            sums,
            ram: guest.ram_value().unwrap(),
        }
    }

    /// Changes the guest's disks and RAM so every snapshot differs.
    fn mutate(&self, guest: &mut Guest, step: u64) {
        for disk in &self.disks {
            let offset = (step % 16) * (REGION / 16);
            guest
                .write_pattern(disk, offset, 64 << 10, 0x1000 + step)
                .unwrap();
        }
        guest.set_ram_value(&format!("ram-{step}")).unwrap();
    }

    async fn create(&self, name: &str, kind: Kind) {
        let request = CreateRequest {
            name: Some(name.into()),
            external: matches!(kind, Kind::External | Kind::ExternalDiskOnly),
            disk_only: kind.disk_only(),
            // `--disk-only` alone is external, as in virsh: internal ones
            // name every disk `snapshot=internal`.
            diskspecs: if kind == Kind::InternalDiskOnly {
                self.disks
                    .iter()
                    .map(|disk| DiskSpec {
                        target: disk.to_string(),
                        mode: Some(DiskSnapshotMode::Internal),
                        file: None,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            ..CreateRequest::default()
        };
        let outcome = self
            .orchestrator()
            .create(&self.name, &request, &no_progress)
            .await
            .unwrap();
        assert_eq!(outcome.name, name);
        let expected_kind = match kind {
            Kind::Internal => SnapshotKind::Internal,
            Kind::External => SnapshotKind::External,
            Kind::InternalDiskOnly => SnapshotKind::DiskOnlyInternal,
            Kind::ExternalDiskOnly => SnapshotKind::DiskOnlyExternal,
        };
        assert_eq!(outcome.kind, expected_kind, "kind of {name}");
    }

    /// Reverts and checks the guest; `slot` holds the guest connection, which
    /// is closed before connecting again (QEMU's socket chardev serves one
    /// client at a time, so the old connection must go first).
    /// A disk-only snapshot (`disks_only`) is reverted with `--running`: the
    /// guest boots afresh from its disks, so only they are compared.
    async fn revert_and_check(
        &self,
        slot: &mut Option<Guest>,
        name: &str,
        expected: &Capture,
        disks_only: bool,
    ) {
        let mode = if disks_only {
            RevertMode::Running
        } else {
            RevertMode::AsRecorded
        };
        let outcome = self
            .orchestrator()
            .revert(&self.name, name, mode, &no_progress)
            .await
            .unwrap();
        assert_eq!(outcome.state, "running", "revert to {name}");
        drop(slot.take());
        let guest = match Guest::connect(self.ctl(), GUEST_TIMEOUT) {
            Ok(guest) => slot.insert(guest),
            Err(err) => {
                let serial =
                    fs::read_to_string(self.host.state_dir().domain_paths(&self.name).serial_log)
                        .unwrap_or_default();
                let tail: Vec<&str> = serial.lines().rev().take(15).collect();
                panic!(
                    "guest unreachable after reverting to {name}: {err}\nconsole tail:\n{}",
                    tail.join("\n")
                );
            }
        };
        let got = self.capture(guest);
        if disks_only {
            assert_eq!(got.sums, expected.sums, "disks after reverting to {name}");
        } else {
            assert_eq!(&got, expected, "guest state after reverting to {name}");
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.dir.path().join("vda.qcow2")];
        if self.disks.contains(&"vdb") {
            out.push(self.dir.path().join("vdb.raw"));
        }
        let snapdir = self
            .host
            .state_dir()
            .domain_paths(&self.name)
            .dir
            .join("snapshots");
        out.extend(lab::dir_entries(&snapdir));
        out.sort();
        out
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(domain) = self.host.domain(&self.name) {
            if let Ok(QemuProcess::Alive(pid)) = domain.process() {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn check_images(files: &[PathBuf]) {
    for file in files {
        if file.extension().is_some_and(|e| e == "qcow2") {
            lab::assert_qemu_img_check(file);
        }
    }
}

const EXPECTED_TREE: &str = "\
s1
  |
  +- s3
  |   |
  |   +- s2
  |   +- s6
  |       |
  |       +- s4
  |       +- s5
  |
  +- s7
      |
      +- s8
";

fn trimmed(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// The fan-out scenario; `kind_of` picks each snapshot's kind.
async fn fan_out(bench: &Bench, kind_of: impl Fn(&str) -> Kind) {
    let mut slot = Some(bench.start().await);
    let mut captured: BTreeMap<String, Capture> = BTreeMap::new();
    let mut step = 0;
    let script: &[(&str, &str)] = &[
        ("create", "s1"),
        ("create", "s3"),
        ("create", "s2"),
        ("revert", "s3"),
        ("create", "s6"),
        ("create", "s5"),
        ("revert", "s6"),
        ("create", "s4"),
        ("revert", "s1"),
        ("create", "s7"),
        ("create", "s8"),
    ];
    for (action, name) in script {
        match *action {
            "create" => {
                step += 1;
                let guest = slot.as_mut().unwrap();
                bench.mutate(guest, step);
                let before = bench.capture(guest);
                bench.create(name, kind_of(name)).await;
                captured.insert(name.to_string(), before);
            }
            _ => {
                let expected = captured[*name].clone();
                bench
                    .revert_and_check(&mut slot, name, &expected, kind_of(name).disk_only())
                    .await;
                // Diverge from the snapshot before the next one.
                step += 1;
                bench.mutate(slot.as_mut().unwrap(), step);
            }
        }
    }
    let orchestrator = bench.orchestrator();
    let tree = orchestrator.tree(&bench.name).unwrap();
    let drawing = render_tree(&tree.tree_entries(None).unwrap());
    assert_eq!(
        trimmed(&drawing),
        trimmed(EXPECTED_TREE),
        "tree:\n{drawing}"
    );
    check_images(&bench.files());

    // Every snapshot still reverts exactly, in any order.
    for name in ["s2", "s5", "s8", "s1", "s4"] {
        let expected = captured[name].clone();
        bench
            .revert_and_check(&mut slot, name, &expected, kind_of(name).disk_only())
            .await;
        step += 1;
        bench.mutate(slot.as_mut().unwrap(), step);
    }
    let size_with_snapshots: u64 = bench.files().iter().map(|f| allocated(f)).sum();

    // Delete inner nodes first (merges), then the rest; the remaining ones
    // keep reverting exactly.
    for (victim, survivor) in [("s3", "s2"), ("s6", "s5"), ("s1", "s4"), ("s7", "s8")] {
        orchestrator
            .delete(&bench.name, victim, DeleteScope::Node, false, &no_progress)
            .await
            .unwrap();
        let expected = captured[survivor].clone();
        bench
            .revert_and_check(
                &mut slot,
                survivor,
                &expected,
                kind_of(survivor).disk_only(),
            )
            .await;
        check_images(&bench.files());
    }
    step += 1;
    let guest = slot.as_mut().unwrap();
    bench.mutate(guest, step);
    let final_state = bench.capture(guest);
    for name in ["s2", "s4", "s5", "s8"] {
        orchestrator
            .delete(&bench.name, name, DeleteScope::Node, false, &no_progress)
            .await
            .unwrap();
    }
    assert!(orchestrator.tree(&bench.name).unwrap().is_empty());
    // The guest kept running on its current state through the deletes.
    assert_eq!(bench.capture(guest), final_state);
    let files = bench.files();
    check_images(&files);
    for file in &files {
        assert!(
            !file.extension().is_some_and(|e| e == "mem"),
            "memory image {} left behind",
            file.display()
        );
        if file.extension().is_some_and(|e| e == "qcow2") {
            let list = lab::qemu_img(&["snapshot", "-U", "-l", file.to_str().unwrap()]);
            assert!(
                list.trim().is_empty(),
                "{} still holds snapshots:\n{list}",
                file.display()
            );
        }
    }
    let chain_files: Vec<PathBuf> = bench
        .host
        .domain(&bench.name)
        .unwrap()
        .disks()
        .iter()
        .flat_map(|c| c.layers.iter().map(|l| l.path.clone()))
        .collect();
    let configured = [
        bench.dir.path().join("vda.qcow2"),
        bench.dir.path().join("vdb.raw"),
    ];
    for file in &files {
        assert!(
            chain_files.contains(file) || configured.contains(file),
            "{} is neither a configured disk nor part of the current state",
            file.display()
        );
    }
    let size_after: u64 = files.iter().map(|f| allocated(f)).sum();
    // About the current state alone: the written region of each disk plus
    // 1 MiB of metadata per file (raw disks count whole). QEMU's snapshot-load leaves the loaded
    // vmstate referenced by the image's live state (hidden past the disk's
    // end) until the next save there: one guest RAM's worth per qcow2 when
    // internal memory snapshots were taken.
    let loads_vmstate = ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]
        .iter()
        .any(|name| kind_of(name) == Kind::Internal);
    let qcow2_files = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
        .count() as u64;
    // A raw disk is all current state, whatever its size.
    let raw_bytes: u64 = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "raw"))
        .map(|f| allocated(f))
        .sum();
    let bound = raw_bytes
        + bench.disks.len() as u64 * REGION
        + files.len() as u64 * (1 << 20)
        + if loads_vmstate {
            qcow2_files * (192 << 20)
        } else {
            0
        };
    assert!(
        size_after <= bound && size_after < size_with_snapshots,
        "storage not given back: {size_after} bytes after deleting all (bound {bound}), {size_with_snapshots} with snapshots: {:?}",
        files.iter().map(|f| (f.display().to_string(), allocated(f))).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn fan_out_internal() {
    let bench = Bench::new("fanint", false);
    fan_out(&bench, |_| Kind::Internal).await;
}

#[tokio::test]
async fn fan_out_external() {
    let bench = Bench::new("fanext", true);
    fan_out(&bench, |_| Kind::External).await;
}

#[tokio::test]
async fn fan_out_disk_only() {
    let bench = Bench::new("fandisk", false);
    fan_out(&bench, |name| {
        if matches!(name, "s1" | "s2" | "s5" | "s7") {
            Kind::InternalDiskOnly
        } else {
            Kind::ExternalDiskOnly
        }
    })
    .await;
}

#[tokio::test]
async fn fan_out_mixed() {
    let bench = Bench::new("fanmix", false);
    fan_out(&bench, |name| {
        if matches!(name, "s1" | "s2" | "s5" | "s7") {
            Kind::Internal
        } else {
            Kind::External
        }
    })
    .await;
}
