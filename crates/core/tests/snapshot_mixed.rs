//! Snapshots that keep one disk inside its qcow2 image and put another on a
//! new overlay, as an xl snapshot config's `disk=['vdev=vda,target=null',
//! 'vdev=vdb,...,target=/path']` asks: with a memory file and disk-only, of
//! a running guest (one QMP transaction) and of a stopped domain (the
//! engine). Each must revert exactly (DESIGN §5.1, §5.2) and delete
//! cleanly, leaving no internal snapshot and no file behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmsnap_core::snapshot::orchestrate::{
    CreateRequest, DiskSpec, Orchestrator, Progress, RevertMode,
};
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::snapshot::DiskSnapshotMode;
use vmsnap_core::{Host, LaunchOptions, LockWait, QemuProcess};
use vmsnap_testguest::lab::{self, DiskDef};
use vmsnap_testguest::Guest;

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
const REGION: u64 = 1 << 20;

fn no_progress(_: Progress<'_>) {}

/// vda internal, vdb external (an overlay in `dir`).
fn mixed_request(name: &str, disk_only: bool, dir: &Path) -> CreateRequest {
    CreateRequest {
        name: Some(name.into()),
        disk_only,
        diskspecs: vec![
            DiskSpec {
                target: "vda".into(),
                mode: Some(DiskSnapshotMode::Internal),
                file: None,
            },
            DiskSpec {
                target: "vdb".into(),
                mode: Some(DiskSnapshotMode::External),
                file: Some(dir.join(format!("vdb.{name}.qcow2"))),
            },
        ],
        ..CreateRequest::default()
    }
}

struct Bench {
    dir: tempfile::TempDir,
    host: Host,
}

impl Bench {
    fn new(name: &str, guest: bool) -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-mixed")
            .tempdir()
            .unwrap();
        let host = Host::open(Some(&dir.path().join("state"))).unwrap();
        for disk in ["vda", "vdb"] {
            lab::create_qcow2(&dir.path().join(format!("{disk}.qcow2")), "16M");
        }
        let disks = [
            DiskDef::qcow2("vda", "vda.qcow2"),
            DiskDef::qcow2("vdb", "vdb.qcow2"),
        ];
        let config = if guest {
            lab::guest_domain_toml(name, 160, &dir.path().join("ctl.sock"), &[], &disks)
        } else {
            lab::stopped_domain_toml(name, 64, &disks)
        };
        fs::write(dir.path().join("dom.toml"), config).unwrap();
        host.define(&dir.path().join("dom.toml"), LockWait::Fail)
            .unwrap();
        Bench { dir, host }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn orchestrator(&self) -> Orchestrator<'_> {
        Orchestrator::new(&self.host).unwrap()
    }

    /// Every qcow2 file of the domain: configured disks and snapshot files.
    fn images(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = lab::dir_entries(self.dir.path())
            .into_iter()
            .chain(lab::files_under(&self.path("state")))
            .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        files.sort();
        files.dedup();
        files
    }

    fn assert_nothing_left(&self, domain: &str) {
        for image in self.images() {
            lab::assert_qemu_img_check(&image);
            let list = lab::qemu_img(&["snapshot", "-U", "-l", image.to_str().unwrap()]);
            assert!(
                list.trim().is_empty(),
                "{} holds snapshots:\n{list}",
                image.display()
            );
        }
        let chain_files: Vec<PathBuf> = self
            .host
            .domain(domain)
            .unwrap()
            .disks()
            .iter()
            .flat_map(|c| c.layers.iter().map(|l| l.path.clone()))
            .collect();
        for file in lab::files_under(&self.path("state/domains").join(domain).join("snapshots")) {
            assert!(
                chain_files.contains(&file),
                "{} left behind after deleting every snapshot",
                file.display()
            );
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for name in ["mixrun", "mixoff"] {
            if let Ok(domain) = self.host.domain(name) {
                if let Ok(QemuProcess::Alive(pid)) = domain.process() {
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
}

fn sums(guest: &mut Guest) -> (String, String) {
    (
        guest.disk_checksum("vda", 0, REGION).unwrap(),
        guest.disk_checksum("vdb", 0, REGION).unwrap(),
    )
}

fn mutate(guest: &mut Guest, step: u64) {
    guest.write_pattern("vda", 0, REGION, 0x40 + step).unwrap();
    guest.write_pattern("vdb", 0, REGION, 0x80 + step).unwrap();
    guest.set_ram_value(&format!("ram-{step}")).unwrap();
}

#[tokio::test]
async fn mixed_internal_and_external_disks_of_a_running_guest() {
    let bench = Bench::new("mixrun", true);
    let dom = "mixrun";
    {
        let (lock, domain) = bench.host.lock(dom, LockWait::Fail).unwrap();
        domain
            .start(bench.host.store(), &lock, LaunchOptions::default())
            .await
            .unwrap();
    }
    let ctl = bench.path("ctl.sock");
    let mut guest = Guest::connect(&ctl, GUEST_TIMEOUT).unwrap();

    // With memory (a file), then disk-only, each mixing the two kinds.
    mutate(&mut guest, 1);
    let at_memory = (sums(&mut guest), guest.ram_value().unwrap());
    let orchestrator = bench.orchestrator();
    let made = orchestrator
        .create(
            dom,
            &mixed_request("withmem", false, bench.dir.path()),
            &no_progress,
        )
        .await
        .unwrap();
    assert!(made.pause_ms.is_some(), "{made:?}");
    mutate(&mut guest, 2);
    let at_disks = sums(&mut guest);
    orchestrator
        .create(
            dom,
            &mixed_request("disks", true, bench.dir.path()),
            &no_progress,
        )
        .await
        .unwrap();
    let stored = orchestrator.get(dom, "disks").unwrap();
    let modes: Vec<DiskSnapshotMode> = stored.meta.disks.iter().map(|d| d.mode).collect();
    assert_eq!(
        modes,
        [DiskSnapshotMode::Internal, DiskSnapshotMode::External]
    );
    mutate(&mut guest, 3);

    drop(guest);
    let outcome = orchestrator
        .revert(dom, "withmem", RevertMode::AsRecorded, &no_progress)
        .await
        .unwrap();
    assert_eq!(outcome.state, "running");
    let mut guest = Guest::connect(&ctl, GUEST_TIMEOUT).unwrap();
    assert_eq!(
        (sums(&mut guest), guest.ram_value().unwrap()),
        at_memory,
        "after reverting to the snapshot with memory"
    );
    mutate(&mut guest, 4);

    drop(guest);
    orchestrator
        .revert(dom, "disks", RevertMode::Running, &no_progress)
        .await
        .unwrap();
    let mut guest = Guest::connect(&ctl, GUEST_TIMEOUT).unwrap();
    assert_eq!(
        sums(&mut guest),
        at_disks,
        "after reverting to the disk-only one"
    );
    mutate(&mut guest, 5);
    let now = (sums(&mut guest), guest.ram_value().unwrap());

    // Deleting both gives everything back; the guest runs on untouched.
    for name in ["withmem", "disks"] {
        orchestrator
            .delete(dom, name, DeleteScope::Node, false, &no_progress)
            .await
            .unwrap();
    }
    assert_eq!((sums(&mut guest), guest.ram_value().unwrap()), now);
    bench.assert_nothing_left(dom);
}

/// The image's first MiB (through its backing chain) is all `byte`.
fn assert_pattern(image: &Path, byte: u8) {
    let out = lab::qemu_io(image, &format!("read -P {byte:#x} 0 1M"));
    assert!(
        !out.contains("verification failed"),
        "{} does not hold {byte:#x}: {out}",
        image.display()
    );
}

#[tokio::test]
async fn mixed_internal_and_external_disks_of_a_stopped_domain() {
    let bench = Bench::new("mixoff", false);
    let dom = "mixoff";
    let (vda, vdb) = (bench.path("vda.qcow2"), bench.path("vdb.qcow2"));
    lab::qemu_io(&vda, "write -P 0x11 0 1M");
    lab::qemu_io(&vdb, "write -P 0x22 0 1M");
    let orchestrator = bench.orchestrator();
    orchestrator
        .create(
            dom,
            &mixed_request("off", false, bench.dir.path()),
            &no_progress,
        )
        .await
        .unwrap();
    let overlay = bench.path("vdb.off.qcow2");
    assert!(overlay.exists());
    assert!(lab::qemu_img(&["snapshot", "-l", vda.to_str().unwrap()]).contains("off"));
    // The domain now writes vda in place and vdb on the overlay.
    lab::qemu_io(&vda, "write -P 0x33 0 1M");
    lab::qemu_io(&overlay, "write -P 0x44 0 1M");

    orchestrator
        .revert(dom, "off", RevertMode::AsRecorded, &no_progress)
        .await
        .unwrap();
    let chains = bench.host.domain(dom).unwrap().disks().to_vec();
    let top = |target: &str| {
        chains.iter().find(|c| c.target == target).unwrap().layers[0]
            .path
            .clone()
    };
    assert_eq!(top("vda"), vda);
    assert_pattern(&top("vda"), 0x11);
    assert_pattern(&top("vdb"), 0x22);

    orchestrator
        .delete(dom, "off", DeleteScope::Node, false, &no_progress)
        .await
        .unwrap();
    bench.assert_nothing_left(dom);
}
