//! Snapshots of a stopped domain, done by vmsnap's own qcow2 engine (no QEMU
//! process): internal (disk-only), external overlays, reverts across both
//! (an internal snapshot held in an image an external snapshot froze is
//! reverted through a copy), deletes with merges. Guest bytes are written
//! and read with qemu-io on the image chain, the oracle for what a guest
//! would see.

use std::fs;
use std::path::{Path, PathBuf};

use vmsnap_core::snapshot::orchestrate::{CreateRequest, Orchestrator, Progress, RevertMode};
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::{Host, LockWait};
use vmsnap_testguest::lab::{self, qemu_io, DiskDef};

fn no_progress(_: Progress<'_>) {}

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
    lab::dir_entries(&host.state_dir().domain_paths("off").dir.join("snapshots"))
}

#[tokio::test]
async fn stopped_domain_internal_and_external() {
    let dir = tempfile::tempdir().unwrap();
    let vda = dir.path().join("vda.qcow2");
    lab::create_qcow2(&vda, "16M");
    fs::write(
        dir.path().join("off.toml"),
        lab::stopped_domain_toml("off", 128, &[DiskDef::qcow2("vda", "vda.qcow2")]),
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
        lab::assert_qemu_img_check_clean(file, "after deleting every snapshot");
        let list = lab::qemu_img(&["snapshot", "-l", file.to_str().unwrap()]);
        assert!(
            list.trim().is_empty(),
            "{} still holds snapshots",
            file.display()
        );
    }
}
