//! Snapshots of a stopped domain, done by vmsnap's own qcow2 engine (no QEMU
//! process): internal (disk-only), external overlays, reverts across both
//! (an internal snapshot held in an image an external snapshot froze is
//! reverted through a copy), deletes with merges. Guest bytes are written
//! and read with qemu-io on the image chain, the oracle for what a guest
//! would see.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmsnap_core::snapshot::orchestrate::{CreateRequest, Orchestrator, Progress, RevertMode};
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::{Host, LockWait};

fn no_progress(_: Progress<'_>) {}

fn qemu_io(image: &Path, command: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command, image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads 1 MiB at `offset` of the disk and checks it is all `byte`.
fn expect(image: &Path, offset: u64, byte: u8) {
    let out = qemu_io(image, &format!("read -P {byte} {offset} 1M"));
    assert!(
        !out.contains("Pattern verification failed"),
        "{} at {offset}: not {byte:#x}\n{out}",
        image.display()
    );
}

fn active(host: &Host) -> PathBuf {
    host.domain("off").unwrap().disks()[0].layers[0]
        .path
        .clone()
}

fn snapshot_files(host: &Host) -> Vec<PathBuf> {
    let dir = host.state_dir().domain_paths("off").dir.join("snapshots");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|e| e.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[tokio::test]
async fn stopped_domain_internal_and_external() {
    let dir = tempfile::tempdir().unwrap();
    let vda = dir.path().join("vda.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", vda.to_str().unwrap(), "16M"])
        .status()
        .unwrap();
    assert!(status.success());
    fs::write(
        dir.path().join("off.toml"),
        "name = \"off\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nfirmware = \"/usr/share/seabios/bios.bin\"\n\n[[disk]]\ntarget = \"vda\"\nfile = \"vda.qcow2\"\nformat = \"qcow2\"\n",
    )
    .unwrap();
    let host = Host::open(Some(&dir.path().join("state"))).unwrap();
    host.define(&dir.path().join("off.toml"), LockWait::Fail)
        .unwrap();
    let orchestrator = Orchestrator::new(&host).unwrap();
    let create = |name: &str, external: bool| CreateRequest {
        name: Some(name.into()),
        external,
        ..CreateRequest::default()
    };

    qemu_io(&vda, "write -P 0x11 0 1M");
    let out = orchestrator
        .create("off", &create("i1", false), &no_progress)
        .await
        .unwrap();
    assert_eq!(out.kind.as_str(), "disk-only-internal");
    qemu_io(&vda, "write -P 0x22 0 1M");
    let out = orchestrator
        .create("off", &create("x1", true), &no_progress)
        .await
        .unwrap();
    assert_eq!(out.kind.as_str(), "disk-only-external");
    let top = active(&host);
    assert_ne!(top, vda);
    qemu_io(&top, "write -P 0x33 0 1M");
    let out = orchestrator
        .create("off", &create("i2", false), &no_progress)
        .await
        .unwrap();
    assert_eq!(out.kind.as_str(), "disk-only-internal");
    qemu_io(&top, "write -P 0x44 0 1M");
    let out = orchestrator
        .create("off", &create("x2", true), &no_progress)
        .await
        .unwrap();
    qemu_io(&active(&host), "write -P 0x55 0 1M");
    assert_eq!(out.name, "x2");

    // Each snapshot reverts to its own bytes, in any order; the guest stays off.
    for (name, byte) in [
        ("i1", 0x11),
        ("x1", 0x22),
        ("i2", 0x33),
        ("x2", 0x44),
        ("i1", 0x11),
        ("i2", 0x33),
    ] {
        let outcome = orchestrator
            .revert("off", name, RevertMode::AsRecorded, &no_progress)
            .await
            .unwrap();
        assert_eq!(outcome.state, "shutoff");
        expect(&active(&host), 0, byte);
        qemu_io(&active(&host), "write -P 0x66 0 1M");
    }
    // The configured image was frozen by x1 and is untouched by the reverts.
    expect(&vda, 0, 0x22);

    // Deleting everything gives back the overlays and internal snapshots; the
    // current state (0x66 written after the last revert) survives.
    for name in ["x1", "i2", "x2", "i1"] {
        orchestrator
            .delete("off", name, DeleteScope::Node, false, &no_progress)
            .await
            .unwrap();
        expect(&active(&host), 0, 0x66);
    }
    assert!(orchestrator.tree("off").unwrap().is_empty());
    let chain: Vec<PathBuf> = host.domain("off").unwrap().disks()[0]
        .layers
        .iter()
        .map(|l| l.path.clone())
        .collect();
    for file in snapshot_files(&host) {
        assert!(chain.contains(&file), "{} left behind", file.display());
    }
    for file in chain.iter().chain(std::iter::once(&vda)) {
        let out = Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        let list = Command::new("qemu-img")
            .args(["snapshot", "-l", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&list.stdout).trim().is_empty(),
            "{} still holds snapshots",
            file.display()
        );
    }
}
