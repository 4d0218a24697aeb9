//! Model-based test on a stopped domain (fast: the qcow2 engine alone, no
//! QEMU process): random sequences of guest writes, internal and external
//! creates, reverts and deletes of any node, checked against a model of what
//! each snapshot and the current state hold (DESIGN §5.1), with images
//! passing `qemu-img check` and storage given back at the end (§5.3).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use vmsnap_core::snapshot::orchestrate::{CreateRequest, Orchestrator, Progress, RevertMode};
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::{Host, LockWait};
use vmsnap_testguest::lab::{self, qemu_io, DiskDef};
use vmsnap_testguest::rng::Rng;

const REGIONS: u64 = 4;
const MIB: u64 = 1 << 20;

fn no_progress(_: Progress<'_>) {}

fn active(host: &Host) -> PathBuf {
    host.domain("model").unwrap().disks()[0].layers[0]
        .path
        .clone()
}

fn check_state(host: &Host, expected: &[u8], context: &str) {
    let image = active(host);
    for (region, byte) in expected.iter().enumerate() {
        let out = qemu_io(
            &image,
            &format!("read -P {byte} {} 1M", region as u64 * MIB),
        );
        assert!(
            !out.contains("verification failed"),
            "{context}: region {region} of {} is not {byte:#x}",
            image.display()
        );
    }
}

fn snapshot_files(host: &Host) -> Vec<PathBuf> {
    lab::dir_entries(&host.state_dir().domain_paths("model").dir.join("snapshots"))
}

fn check_images(host: &Host, base: &Path, context: &str) {
    let mut files = snapshot_files(host);
    files.push(base.to_path_buf());
    for file in files {
        lab::assert_qemu_img_check_clean(&file, context);
    }
}

async fn run(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vda.qcow2");
    lab::create_qcow2(&base, "8M");
    fs::write(
        dir.path().join("model.toml"),
        lab::stopped_domain_toml("model", 128, &[DiskDef::qcow2("vda", "vda.qcow2")]),
    )
    .unwrap();
    let host = Host::open(Some(&dir.path().join("state"))).unwrap();
    host.define(&dir.path().join("model.toml"), LockWait::Fail)
        .unwrap();
    let orchestrator = Orchestrator::new(&host).unwrap();
    let mut rng = Rng::from_state(seed);
    let mut current = vec![0u8; REGIONS as usize];
    let mut snapshots: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut counter = 0;
    for step in 0..steps {
        let names: Vec<String> = snapshots.keys().cloned().collect();
        let context = format!("seed {seed} step {step}");
        match rng.below(10) {
            0..=3 => {
                let region = rng.below(REGIONS);
                let byte = 1 + rng.below(250) as u8;
                qemu_io(
                    &active(&host),
                    &format!("write -P {byte} {} 1M", region * MIB),
                );
                current[region as usize] = byte;
            }
            4..=5 => {
                counter += 1;
                let name = format!("s{counter}");
                let request = CreateRequest {
                    name: Some(name.clone()),
                    external: rng.below(2) == 0,
                    ..CreateRequest::default()
                };
                orchestrator
                    .create("model", &request, &no_progress)
                    .await
                    .unwrap();
                snapshots.insert(name, current.clone());
            }
            6..=7 if !names.is_empty() => {
                let name = rng.pick(&names);
                orchestrator
                    .revert("model", name, RevertMode::AsRecorded, &no_progress)
                    .await
                    .unwrap();
                current = snapshots[name].clone();
            }
            8..=9 if !names.is_empty() => {
                let name = rng.pick(&names);
                orchestrator
                    .delete("model", name, DeleteScope::Node, false, &no_progress)
                    .await
                    .unwrap();
                snapshots.remove(name);
            }
            _ => {}
        }
        check_state(&host, &current, &context);
        check_images(&host, &base, &context);
    }
    // Every remaining snapshot still holds its bytes.
    for (name, bytes) in &snapshots {
        orchestrator
            .revert("model", name, RevertMode::AsRecorded, &no_progress)
            .await
            .unwrap();
        check_state(
            &host,
            bytes,
            &format!("seed {seed}: final revert to {name}"),
        );
        current = bytes.clone();
    }
    for name in snapshots.keys() {
        orchestrator
            .delete("model", name, DeleteScope::Node, false, &no_progress)
            .await
            .unwrap();
    }
    check_state(&host, &current, &format!("seed {seed}: after deleting all"));
    assert!(orchestrator.tree("model").unwrap().is_empty());
    // Only the current chain remains.
    let chain: Vec<PathBuf> = host.domain("model").unwrap().disks()[0]
        .layers
        .iter()
        .map(|l| l.path.clone())
        .collect();
    for file in snapshot_files(&host) {
        assert!(
            chain.contains(&file),
            "seed {seed}: {} left behind",
            file.display()
        );
    }
    // And that chain is the configured image with at most one overlay: every
    // layer between them was merged away.
    assert!(
        chain.len() <= 2,
        "seed {seed}: the current chain stayed {} layers deep: {chain:?}",
        chain.len()
    );
}

/// Three seeds by default (about 15 s); `VMSNAP_MODEL_SEEDS=N` runs N.
#[tokio::test]
async fn random_sequences_keep_every_snapshot_exact() {
    let seeds: u64 = std::env::var("VMSNAP_MODEL_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    for seed in 0..seeds {
        run(0x5eed_0001 + seed, 40).await;
    }
}
