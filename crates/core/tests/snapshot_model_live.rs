//! Model-based test on a RUNNING test guest (TCG): random sequences, bounded
//! in time, of guest writes (disks and RAM), creates of every kind (internal
//! and external with memory, internal and external disk-only, and vda
//! internal + vdb external with and without a memory file), reverts to any
//! snapshot and deletes of any node (alone, with its children, or its
//! children only), checked after EVERY step against a model that holds the
//! exact bytes of each disk's checked region and the RAM value, per snapshot
//! and for the current state:
//!
//! - the guest's disks, RAM value and boot id are the model's current state
//!   (after a revert: the snapshot's, DESIGN §5.1 and §5.2; a disk-only
//!   snapshot is reverted with `--running` and boots the guest afresh, so
//!   its RAM value is empty and its boot id new);
//! - every qcow2 file of the domain passes `qemu-img check -U`;
//! - every file in the domain's snapshot directory belongs to a recorded
//!   snapshot or to the current chains, every file a snapshot needs exists,
//!   and every internal snapshot inside an image belongs to a recorded one
//!   (§5.3 along the way);
//! - the tree (names, parents, current snapshot) is the model's.
//!
//! At the end every remaining snapshot is reverted to and checked, then all
//! are deleted: no internal snapshot, no memory file, no stray file remains,
//! and the domain's files are about the current state's size (§5.3).
//!
//! The seed is printed. By default it is a fixed one whose 150 steps are
//! known to pass, so CI stays reproducible; `VMSNAP_MODEL_SEED=random`
//! explores a new sequence and `VMSNAP_MODEL_SEED=N` (decimal or 0x-hex)
//! replays one. `VMSNAP_MODEL_SECS` (default 75) bounds the random phase in time and
//! `VMSNAP_MODEL_STEPS` (default 150) in steps; a replay with the same seed
//! takes the same steps, as far as the bounds let it go (the test prints the
//! step count: give it as `VMSNAP_MODEL_STEPS` with a large
//! `VMSNAP_MODEL_SECS` to replay a run exactly).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmsnap_core::snapshot::orchestrate::{
    CreateRequest, DiskCapture, DiskSpec, Orchestrator, Progress, RevertMode,
};
use vmsnap_core::snapshot::tree::DeleteScope;
use vmsnap_core::snapshot::{DiskSnapshotMode, MemorySnapshot, SnapshotKind};
use vmsnap_core::{Host, LaunchOptions, LockWait};
use vmsnap_testguest::lab::{self, DiskDef};
use vmsnap_testguest::rng::Rng;
use vmsnap_testguest::{pattern_bytes, sha256_hex, Guest};

const DOM: &str = "modlive";
const DISKS: [&str; 2] = ["vda", "vdb"];
const MEMORY_MIB: u32 = 160;
/// The region of each disk the guest writes to and the test checks (the
/// guest hashes about 5 MiB/s under TCG: 1 MiB per disk keeps a check short).
const REGION: u64 = 1 << 20;
/// Guest writes are made of these units, at unit-aligned offsets.
const UNIT: u64 = 64 << 10;
/// Creates give way to deletes at this many snapshots, which bounds the
/// final phase (one revert per remaining snapshot).
const MAX_SNAPSHOTS: usize = 6;
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn no_progress(_: Progress<'_>) {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Create,
    Revert,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// QMP snapshot-save: vmstate and disks inside the qcow2 images.
    Internal,
    /// `--external`: overlays and a memory file.
    External,
    /// Disks alone, inside the images.
    InternalDiskOnly,
    /// Disks alone, onto overlays.
    ExternalDiskOnly,
    /// vda internal, vdb on an overlay, memory in a file.
    Mixed,
    /// vda internal, vdb on an overlay, no memory.
    MixedDiskOnly,
}

const KINDS: [Kind; 6] = [
    Kind::Internal,
    Kind::External,
    Kind::InternalDiskOnly,
    Kind::ExternalDiskOnly,
    Kind::Mixed,
    Kind::MixedDiskOnly,
];

impl Kind {
    fn disk_only(self) -> bool {
        matches!(
            self,
            Kind::InternalDiskOnly | Kind::ExternalDiskOnly | Kind::MixedDiskOnly
        )
    }

    fn request(self, name: &str) -> CreateRequest {
        let spec = |target: &str, mode| DiskSpec {
            target: target.into(),
            mode: Some(mode),
            file: None,
        };
        let diskspecs = match self {
            Kind::Mixed | Kind::MixedDiskOnly => vec![
                spec("vda", DiskSnapshotMode::Internal),
                spec("vdb", DiskSnapshotMode::External),
            ],
            // As in virsh, --disk-only alone is external: internal needs
            // snapshot=internal on every disk.
            Kind::InternalDiskOnly => vec![
                spec("vda", DiskSnapshotMode::Internal),
                spec("vdb", DiskSnapshotMode::Internal),
            ],
            _ => Vec::new(),
        };
        CreateRequest {
            name: Some(name.into()),
            disk_only: self.disk_only(),
            external: matches!(self, Kind::External | Kind::ExternalDiskOnly),
            diskspecs,
            ..CreateRequest::default()
        }
    }

    /// The kind the snapshot must be recorded as (libvirt's location rule:
    /// any external part makes it external).
    fn recorded(self) -> SnapshotKind {
        match self {
            Kind::Internal => SnapshotKind::Internal,
            Kind::External | Kind::Mixed => SnapshotKind::External,
            Kind::InternalDiskOnly => SnapshotKind::DiskOnlyInternal,
            Kind::ExternalDiskOnly | Kind::MixedDiskOnly => SnapshotKind::DiskOnlyExternal,
        }
    }
}

/// What the guest holds: the bytes of each disk's checked region, the RAM
/// value, and the boot id of the running kernel (kept by a memory revert,
/// new after a disk-only one).
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    disks: BTreeMap<&'static str, Vec<u8>>,
    ram: String,
    boot: String,
}

impl State {
    fn sums(&self) -> BTreeMap<&'static str, String> {
        self.disks
            .iter()
            .map(|(disk, bytes)| (*disk, sha256_hex(bytes)))
            .collect()
    }
}

#[derive(Debug, Clone)]
struct Snap {
    kind: Kind,
    /// The state captured; its RAM value only counts with memory.
    state: State,
    parent: Option<String>,
}

/// The model: every snapshot, the tree, and the current state.
struct Model {
    snaps: BTreeMap<String, Snap>,
    current: Option<String>,
    state: State,
}

impl Model {
    fn children(&self, name: &str) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, s)| s.parent.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn descendants(&self, name: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = self.children(name);
        while let Some(next) = todo.pop() {
            todo.extend(self.children(&next));
            out.insert(next);
        }
        out
    }

    /// virsh's delete: children of a node deleted alone move up to its
    /// parent; a deleted current snapshot passes "current" to its nearest
    /// surviving ancestor. Returns the removed names.
    fn delete(&mut self, name: &str, scope: DeleteScope) -> BTreeSet<String> {
        let mut removed = match scope {
            DeleteScope::Node => BTreeSet::new(),
            DeleteScope::WithChildren | DeleteScope::ChildrenOnly => self.descendants(name),
        };
        if scope != DeleteScope::ChildrenOnly {
            removed.insert(name.to_string());
        }
        if scope == DeleteScope::Node {
            let up = self.snaps[name].parent.clone();
            for snap in self.snaps.values_mut() {
                if snap.parent.as_deref() == Some(name) {
                    snap.parent = up.clone();
                }
            }
        }
        if let Some(current) = self.current.clone() {
            if removed.contains(&current) {
                let mut at = self.snaps[&current].parent.clone();
                while let Some(a) = at.clone() {
                    if !removed.contains(&a) {
                        break;
                    }
                    at = self.snaps[&a].parent.clone();
                }
                self.current = at;
            }
        }
        for gone in &removed {
            self.snaps.remove(gone);
        }
        removed
    }
}

/// The domain, its directory and the guest connection.
struct Bench {
    dir: tempfile::TempDir,
    host: Host,
    guest: Option<Guest>,
    /// Largest vmstate seen inside an image (bytes), for the size check.
    max_vmstate: u64,
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Never leave a QEMU behind, whatever happened.
        lab::kill_qemu(&self.dir.path().join("state"), DOM);
    }
}

impl Bench {
    async fn new() -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("vmsnap-modlive")
            .tempdir()
            .unwrap();
        lab::create_qcow2(&dir.path().join("vda.qcow2"), "32M");
        lab::create_qcow2(&dir.path().join("vdb.qcow2"), "16M");
        let config = lab::guest_domain_toml(
            DOM,
            MEMORY_MIB,
            &dir.path().join("ctl.sock"),
            &[],
            &[
                DiskDef::qcow2("vda", "vda.qcow2"),
                DiskDef::qcow2("vdb", "vdb.qcow2"),
            ],
        );
        fs::write(dir.path().join("dom.toml"), config).unwrap();
        let host = Host::open(Some(&dir.path().join("state"))).unwrap();
        host.define(&dir.path().join("dom.toml"), LockWait::Fail)
            .unwrap();
        let mut bench = Bench {
            dir,
            host,
            guest: None,
            max_vmstate: 0,
        };
        {
            let (lock, domain) = bench.host.lock(DOM, LockWait::Fail).unwrap();
            domain
                .start(bench.host.store(), &lock, LaunchOptions::default())
                .await
                .unwrap();
        }
        bench.connect("start");
        bench
    }

    /// The recorded chains and snapshot storage, for failure messages.
    fn dump(&self) -> String {
        let orchestrator = self.orchestrator();
        let snaps = orchestrator.snapshots();
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let mut out = String::from("current chains (base first):\n");
        for chain in snaps.chains(DOM).unwrap() {
            let layers: Vec<String> = chain.layers.iter().rev().map(|l| name(&l.path)).collect();
            out.push_str(&format!("  {}: {}\n", chain.target, layers.join(" <- ")));
        }
        for snap in snaps.snapshots(DOM).unwrap() {
            out.push_str(&format!(
                "snapshot {} (parent {:?}, {:?}):\n",
                snap.name,
                snap.meta.parent,
                snap.meta.kind()
            ));
            for (disk, capture) in &snap.storage.disks {
                let text = match capture {
                    DiskCapture::Internal { chain, tag } => format!(
                        "internal {tag} in {}",
                        chain
                            .0
                            .iter()
                            .map(|l| name(&l.file))
                            .collect::<Vec<_>>()
                            .join(" <- ")
                    ),
                    DiskCapture::External { chain } => format!(
                        "external {}",
                        chain
                            .0
                            .iter()
                            .map(|l| name(&l.file))
                            .collect::<Vec<_>>()
                            .join(" <- ")
                    ),
                    DiskCapture::Excluded => "excluded".into(),
                };
                out.push_str(&format!("  {disk}: {text}\n"));
            }
        }
        out
    }

    fn orchestrator(&self) -> Orchestrator<'_> {
        Orchestrator::new(&self.host).unwrap()
    }

    fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.host
            .state_dir()
            .domain_paths(DOM)
            .dir
            .join("snapshots")
    }

    fn connect(&mut self, context: &str) {
        match Guest::connect(self.ctl(), GUEST_TIMEOUT) {
            Ok(guest) => self.guest = Some(guest),
            Err(err) => {
                let serial = fs::read_to_string(self.host.state_dir().domain_paths(DOM).serial_log)
                    .unwrap_or_default();
                let tail: Vec<&str> = serial.lines().rev().take(15).collect();
                panic!(
                    "{context}: guest unreachable: {err}\nconsole tail (newest first):\n{}",
                    tail.join("\n")
                );
            }
        }
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().expect("connected to the guest")
    }

    /// The domain's files: its configured disks and everything in its
    /// snapshot directory.
    fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![
            self.dir.path().join("vda.qcow2"),
            self.dir.path().join("vdb.qcow2"),
        ];
        out.extend(lab::files_under(&self.snapshot_dir()));
        out
    }

    fn qcow2_files(&self) -> Vec<PathBuf> {
        self.files()
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
            .collect()
    }

    /// The internal snapshots of an image, by name, with their vmstate sizes.
    fn internal_snapshots(&self, image: &Path) -> Vec<(String, u64)> {
        let text = lab::qemu_img(&[
            "info",
            "-U",
            "-f",
            "qcow2",
            "--output=json",
            image.to_str().unwrap(),
        ]);
        let info: serde_json::Value = serde_json::from_str(&text).unwrap();
        info["snapshots"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|s| {
                        (
                            s["name"].as_str().unwrap().to_string(),
                            s["vm-state-size"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks promises 1–3 and the tree against the model.
    fn check(&mut self, model: &Model, context: &str) {
        // The guest's disks and RAM are the model's current state.
        let expected = model.state.sums();
        let guest = self.guest();
        for (disk, sum) in &expected {
            let got = guest.disk_checksum(disk, 0, REGION).unwrap();
            assert_eq!(&got, sum, "{context}: disk {disk} differs from the model");
        }
        let ram = guest.ram_value().unwrap();
        assert_eq!(ram, model.state.ram, "{context}: RAM value");
        let boot = guest.ping().unwrap();
        assert_eq!(boot, model.state.boot, "{context}: guest boot id");

        // The tree is the model's.
        let orchestrator = self.orchestrator();
        let tree = orchestrator.tree(DOM).unwrap();
        let got: BTreeMap<String, Option<String>> = tree
            .metas()
            .map(|m| (m.name.clone(), m.parent.clone()))
            .collect();
        let want: BTreeMap<String, Option<String>> = model
            .snaps
            .iter()
            .map(|(n, s)| (n.clone(), s.parent.clone()))
            .collect();
        assert_eq!(got, want, "{context}: snapshots and their parents");
        assert_eq!(
            tree.current().map(|m| m.name.clone()),
            model.current,
            "{context}: current snapshot"
        );

        // Every qcow2 file checks; every file is needed by a snapshot or the
        // current state, and every file a snapshot needs exists.
        let stored = orchestrator.snapshots().snapshots(DOM).unwrap();
        let chains = orchestrator.snapshots().chains(DOM).unwrap();
        let mut needed: BTreeSet<PathBuf> = chains
            .iter()
            .flat_map(|c| c.layers.iter().map(|l| l.path.clone()))
            .collect();
        // (image, tag) of every internal snapshot a record holds.
        let mut tags: BTreeSet<(PathBuf, String)> = BTreeSet::new();
        for snap in &stored {
            assert_eq!(
                snap.meta.kind(),
                model.snaps[&snap.name].kind.recorded(),
                "{context}: kind of {}",
                snap.name
            );
            needed.extend(snap.storage.image_files().map(Path::to_path_buf));
            if let MemorySnapshot::External { path } = &snap.meta.memory {
                needed.insert(path.clone());
            }
            for capture in snap.storage.disks.values() {
                if let DiskCapture::Internal { chain, tag } = capture {
                    tags.insert((chain.top().file.clone(), tag.clone()));
                }
            }
        }
        for file in &needed {
            assert!(
                file.exists(),
                "{context}: {} is needed but missing",
                file.display()
            );
        }
        // The configured disks are the user's: vmsnap never removes them,
        // even once the domain runs on a clone made by a revert.
        let files: Vec<PathBuf> = lab::files_under(&self.snapshot_dir());
        for file in &files {
            assert!(
                needed.contains(file),
                "{context}: {} belongs to no snapshot nor the current state (needed: {needed:?})",
                file.display()
            );
        }
        for image in self.qcow2_files() {
            lab::assert_qemu_img_check(&image);
            for (tag, vmstate) in self.internal_snapshots(&image) {
                self.max_vmstate = self.max_vmstate.max(vmstate);
                assert!(
                    tags.contains(&(image.clone(), tag.clone())),
                    "{context}: {} holds internal snapshot {tag} that no snapshot records",
                    image.display()
                );
            }
        }
        for (image, tag) in &tags {
            assert!(
                self.internal_snapshots(image).iter().any(|(t, _)| t == tag),
                "{context}: internal snapshot {tag} missing from {}",
                image.display()
            );
        }
    }

    async fn revert(&mut self, model: &mut Model, name: &str) {
        let snap = model.snaps[name].clone();
        let mode = if snap.kind.disk_only() {
            // The guest boots afresh from the snapshot's disks.
            RevertMode::Running
        } else {
            RevertMode::AsRecorded
        };
        // QEMU's socket chardev serves one client at a time: close ours.
        drop(self.guest.take());
        let outcome = self
            .orchestrator()
            .revert(DOM, name, mode, &no_progress)
            .await
            .unwrap_or_else(|e| panic!("revert to {name}: {e}\n{}", self.dump()));
        assert_eq!(outcome.state, "running", "revert to {name}");
        self.connect(&format!("revert to {name}"));
        let before = std::mem::replace(&mut model.state, snap.state);
        if snap.kind.disk_only() {
            // A fresh boot: empty RAM value, a new boot id.
            model.state.ram = String::new();
            let boot = self.guest().boot_id().to_string();
            assert_ne!(
                boot, before.boot,
                "revert to {name}: the guest did not boot afresh"
            );
            model.state.boot = boot;
        }
        model.current = Some(name.to_string());
    }

    async fn delete(&mut self, model: &mut Model, name: &str, scope: DeleteScope) {
        let outcome = self
            .orchestrator()
            .delete(DOM, name, scope, false, &no_progress)
            .await
            .unwrap_or_else(|e| panic!("delete {name} ({scope:?}): {e}\n{}", self.dump()));
        let removed = model.delete(name, scope);
        let got: BTreeSet<String> = outcome.removed.into_iter().collect();
        assert_eq!(got, removed, "delete {name} ({scope:?}) removed");
    }
}

/// The seed CI runs: its 150 steps pass (it found the sparse-copy bug of
/// reverts that clone an image, so its sequence is a demanding one).
const DEFAULT_SEED: u64 = 0x18ee_4cf8_e66f_83eb;

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[tokio::test]
async fn random_live_sequences_keep_promises_1_to_3() {
    let seed = match std::env::var("VMSNAP_MODEL_SEED").as_deref() {
        Ok("random") => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        _ => env_u64("VMSNAP_MODEL_SEED").unwrap_or(DEFAULT_SEED),
    };
    let budget = Duration::from_secs(env_u64("VMSNAP_MODEL_SECS").unwrap_or(75));
    let max_steps = env_u64("VMSNAP_MODEL_STEPS").unwrap_or(150);
    println!("snapshot_model_live: seed {seed:#x} (replay: VMSNAP_MODEL_SEED={seed:#x})");
    let started = Instant::now();
    let mut rng = Rng::seeded(seed);
    let mut bench = Bench::new().await;
    let mut model = Model {
        snaps: BTreeMap::new(),
        current: None,
        state: State {
            disks: DISKS
                .iter()
                .map(|d| (*d, vec![0u8; REGION as usize]))
                .collect(),
            ram: String::new(),
            boot: bench.guest().boot_id().to_string(),
        },
    };
    bench.check(&model, &format!("seed {seed:#x}: after boot"));
    let mut counter = 0;
    let mut step = 0;
    let phase = Instant::now();
    while step < max_steps && phase.elapsed() < budget {
        step += 1;
        let names: Vec<String> = model.snaps.keys().cloned().collect();
        // 35% writes, 25% creates (deletes once MAX_SNAPSHOTS exist), 20%
        // reverts, 20% deletes; writes where there is nothing to revert to.
        let op = match rng.below(100) {
            0..=34 => Op::Write,
            35..=59 if names.len() < MAX_SNAPSHOTS => Op::Create,
            _ if names.is_empty() => Op::Write,
            35..=59 => Op::Delete,
            60..=79 => Op::Revert,
            _ => Op::Delete,
        };
        let action = if op == Op::Write {
            // Guest writes: one disk range and (mostly) the RAM value.
            let disk = *rng.pick(&DISKS);
            let units = REGION / UNIT;
            let first = rng.below(units);
            let count = (1 + rng.below(4)).min(units - first);
            let (offset, len) = (first * UNIT, count * UNIT);
            let pattern = rng.next_u64();
            bench
                .guest()
                .write_pattern(disk, offset, len, pattern)
                .unwrap();
            let bytes = pattern_bytes(offset, len, pattern).unwrap();
            model.state.disks.get_mut(disk).unwrap()[offset as usize..(offset + len) as usize]
                .copy_from_slice(&bytes);
            let mut action = format!("write {disk} {offset}+{len} pattern {pattern:#x}");
            if rng.below(4) != 0 {
                let value = format!("ram-{step}-{:x}", rng.next_u64() & 0xffff);
                bench.guest().set_ram_value(&value).unwrap();
                action.push_str(&format!(", RAM {value}"));
                model.state.ram = value;
            }
            action
        } else if op == Op::Create {
            counter += 1;
            let name = format!("s{counter}");
            let kind = *rng.pick(&KINDS);
            let outcome = bench
                .orchestrator()
                .create(DOM, &kind.request(&name), &no_progress)
                .await
                .unwrap_or_else(|e| panic!("create {name} ({kind:?}): {e}\n{}", bench.dump()));
            assert_eq!(outcome.kind, kind.recorded(), "create {name} ({kind:?})");
            model.snaps.insert(
                name.clone(),
                Snap {
                    kind,
                    state: model.state.clone(),
                    parent: model.current.clone(),
                },
            );
            model.current = Some(name.clone());
            format!("create {name} {kind:?} (pause {:?} ms)", outcome.pause_ms)
        } else if op == Op::Revert {
            let name = rng.pick(&names).clone();
            let kind = model.snaps[&name].kind;
            bench.revert(&mut model, &name).await;
            format!("revert {name} ({kind:?})")
        } else {
            let name = rng.pick(&names).clone();
            let has_children = !model.children(&name).is_empty();
            let scope = match rng.below(8) {
                0 | 1 if has_children => DeleteScope::WithChildren,
                2 if has_children => DeleteScope::ChildrenOnly,
                _ => DeleteScope::Node,
            };
            bench.delete(&mut model, &name, scope).await;
            format!("delete {name} {scope:?}")
        };
        let context = format!(
            "seed {seed:#x} step {step} ({action}) at {:.1}s",
            started.elapsed().as_secs_f64()
        );
        println!("{context}");
        bench.check(&model, &context);
    }
    println!(
        "seed {seed:#x}: random phase done, {step} steps in {:.1}s, {} snapshots left \
         (replay: VMSNAP_MODEL_SEED={seed:#x} VMSNAP_MODEL_STEPS={step} VMSNAP_MODEL_SECS=1000)",
        phase.elapsed().as_secs_f64(),
        model.snaps.len()
    );

    // Every remaining snapshot still reverts exactly.
    let names: Vec<String> = model.snaps.keys().cloned().collect();
    for name in &names {
        println!("seed {seed:#x}: final revert to {name}");
        bench.revert(&mut model, name).await;
        bench.check(&model, &format!("seed {seed:#x}: final revert to {name}"));
    }
    // Diverge from the last one, then delete everything, in random order
    // (inner nodes too: merges).
    let value = "final".to_string();
    bench.guest().set_ram_value(&value).unwrap();
    bench.guest().write_pattern("vdb", 0, UNIT, 0xf1a1).unwrap();
    model.state.ram = value;
    model.state.disks.get_mut("vdb").unwrap()[..UNIT as usize]
        .copy_from_slice(&pattern_bytes(0, UNIT, 0xf1a1).unwrap());
    bench.check(&model, &format!("seed {seed:#x}: before deleting all"));
    while !model.snaps.is_empty() {
        let names: Vec<String> = model.snaps.keys().cloned().collect();
        let name = rng.pick(&names).clone();
        println!("seed {seed:#x}: final delete of {name}");
        bench.delete(&mut model, &name, DeleteScope::Node).await;
        bench.check(&model, &format!("seed {seed:#x}: final delete of {name}"));
    }
    assert!(bench.orchestrator().tree(DOM).unwrap().is_empty());

    // Promise 3: nothing of any snapshot remains.
    let files = bench.files();
    for file in &files {
        assert!(
            !file.extension().is_some_and(|e| e == "mem"),
            "seed {seed:#x}: memory image {} left behind",
            file.display()
        );
    }
    let images = bench.qcow2_files();
    for image in &images {
        let list = lab::qemu_img(&["snapshot", "-U", "-l", image.to_str().unwrap()]);
        assert!(
            list.trim().is_empty(),
            "seed {seed:#x}: {} still holds snapshots:\n{list}",
            image.display()
        );
    }
    // About the current state's size. The current state is at most REGION of
    // guest data per disk, in whichever layers of its chain; each image adds
    // its metadata (header, L1/L2 and refcount tables: well under 1 MiB at
    // these sizes). One more allowance per vda image, where the vmstate of
    // internal snapshots goes: QEMU's snapshot-load makes the image's live
    // state reference the loaded vmstate (past the disk's end), and deleting
    // that snapshot while no other load or apply replaced the live state
    // leaves those clusters in use. That is at most one vmstate per image
    // (the largest one seen in this run, bounded by the RAM), also in the
    // configured image when a revert left it outside the current chain.
    let total: u64 = files.iter().map(|f| allocated(f)).sum();
    let chains = bench.orchestrator().snapshots().chains(DOM).unwrap();
    let vda_images = images
        .iter()
        .filter(|image| {
            image
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vda")
        })
        .count() as u64;
    let layers: Vec<usize> = chains.iter().map(|c| c.layers.len()).collect();
    let slack = bench.max_vmstate.div_ceil(MIB) * MIB;
    let bound = DISKS.len() as u64 * REGION + images.len() as u64 * MIB + vda_images * slack;
    println!(
        "seed {seed:#x}: {} files, chain layers {layers:?}, {total} bytes allocated after deleting all \
         (bound {bound}: largest vmstate {slack}), {:.1}s in all",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        layers.iter().all(|&n| n <= 2),
        "seed {seed:#x}: chains stayed deep after deleting all (layers {layers:?}):\n{}",
        bench.dump()
    );
    assert!(
        total <= bound,
        "seed {seed:#x}: storage not given back: {total} bytes > {bound}: {:?}",
        files
            .iter()
            .map(|f| (f.display().to_string(), allocated(f)))
            .collect::<Vec<_>>()
    );
}
