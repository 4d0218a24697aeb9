//! The snapshot operations: create, revert, delete, redefine, and the
//! recovery and clean-up every command runs first and last. Each holds the
//! domain lock for its whole run, journals its steps, and commits its records
//! in one transaction (see the module docs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmsnap_qmp::{Qmp, RunState as QemuRunState};

use super::error::{Result, SnapshotError};
use super::model::{
    chain_of, chains_of, disk_chain_of, node_name_for, Chain, DiskCapture, Layer, SnapshotStorage,
};
use super::offline;
use super::plan::{
    live_content_needed, needed_files, plan_merge, with_stale_merges, without_layer, Merge,
};
use super::recover::job_id;
use super::runtime::{qmp_error, shell_quote, FdMonitor};
use super::spec::{DiskSpec, MemSpec};
use super::store::{failpoint, Change, Intent, Operation, SnapshotStore, StoredSnapshot};
use crate::cmdline::LaunchOptions;
use crate::config::{DiskFormat, DomainConfig};
use crate::disk::{file_node_name, DiskChain};
use crate::domain::Host;
use crate::lock::{DomainLock, LockWait};
use crate::snapshot::meta::{
    DiskSnapshotMode, DiskSnapshotRecord, MemorySnapshot, SnapshotKind, SnapshotMeta, SnapshotState,
};
use crate::snapshot::name::validate_snapshot_name;
use crate::snapshot::tree::{DeleteScope, SnapshotTree};
use crate::state::DomainPaths;
use crate::store::Store;

/// The name under which QEMU holds the memory image's descriptor.
const MEMORY_FD_NAME: &str = "vmsnap-memory";

/// How long a snapshot-save/-load/-delete job or a memory save may take.
pub(super) const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// A step's progress, for callers that draw progress bars (the core never prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// What is being done ("saving memory", "loading memory", "merging vda").
    pub step: &'a str,
    /// Units done so far (bytes where known).
    pub done: u64,
    /// Units in total (0 when unknown).
    pub total: u64,
}

/// A progress callback.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress<'_>) + Sync);

/// What `snapshot-create-as` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// The name; a timestamp (as virsh uses) when absent.
    pub name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// `--disk-only`: no memory.
    pub disk_only: bool,
    /// `--memspec`.
    pub memspec: Option<MemSpec>,
    /// `--diskspec`, one per disk named.
    pub diskspecs: Vec<DiskSpec>,
    /// `--external`: external snapshot with files named by vmsnap.
    pub external: bool,
    /// `--halt`: end the domain's QEMU once the snapshot is recorded (as
    /// `destroy` does), so a script can snapshot and stop in one step; a
    /// stopped domain stays as it is.
    pub halt: bool,
    /// `--reuse-external`: overlays named by a diskspec's `file=` already
    /// exist (made by the caller, e.g. with a relative backing name) and are
    /// taken as they are instead of refused, once checked to be empty qcow2
    /// overlays of the disk's active image.
    pub reuse_external: bool,
}

/// What a created snapshot turned out to be.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CreateOutcome {
    /// The snapshot's name.
    pub name: String,
    /// Its kind.
    pub kind: SnapshotKind,
    /// How long the guest's vCPUs were stopped (QMP STOP to RESUME), when it ran.
    pub pause_ms: Option<f64>,
    /// Whether memory was saved with the guest running (background snapshot).
    pub background: bool,
    /// Notes for the user (e.g. the paused-save fallback).
    pub notes: Vec<String>,
}

/// Run state a revert leaves the guest in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum RevertMode {
    /// The state the snapshot recorded.
    #[default]
    AsRecorded,
    /// `--running`.
    Running,
    /// `--paused`.
    Paused,
}

/// A domain loaded and locked for one operation.
pub(super) struct Domain {
    pub(super) name: String,
    pub(super) config: DomainConfig,
    pub(super) paths: DomainPaths,
    pub(super) vm: crate::domain::Domain,
    pub(super) lock: DomainLock,
}

/// Snapshot operations over one vmsnap installation.
pub struct Orchestrator<'a> {
    pub(super) host: &'a Host,
    pub(super) snaps: SnapshotStore<'a>,
    pub(super) wait: LockWait,
}

fn io_error(action: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let action = action.to_string();
    let path = path.to_path_buf();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}

fn now_unix() -> i64 {
    crate::store::now_unix()
}

fn event_ms(event: &vmsnap_qmp::Event) -> f64 {
    event.timestamp.seconds as f64 * 1000.0 + event.timestamp.microseconds as f64 / 1000.0
}

impl<'a> Orchestrator<'a> {
    /// Snapshot operations on `host`'s domains; commands on a domain that
    /// another vmsnap is working on fail at once (see [`Self::wait_for_lock`]).
    pub fn new(host: &'a Host) -> Result<Orchestrator<'a>> {
        Ok(Orchestrator {
            host,
            snaps: SnapshotStore::new(host.store())?,
            wait: LockWait::Fail,
        })
    }

    /// Makes operations wait for a busy domain instead of failing.
    pub fn wait_for_lock(mut self, wait: bool) -> Self {
        self.wait = if wait { LockWait::Wait } else { LockWait::Fail };
        self
    }

    /// The snapshot tables.
    pub fn snapshots(&self) -> &SnapshotStore<'a> {
        &self.snaps
    }

    pub(super) fn store(&self) -> &Store {
        self.snaps.store()
    }

    fn config(&self, domain: &str) -> Result<DomainConfig> {
        Ok(self.host.domain(domain)?.config().clone())
    }

    pub(super) fn lock(&self, domain: &str) -> Result<Domain> {
        let (lock, vm) = self.host.lock(domain, self.wait)?;
        Ok(Domain {
            name: domain.to_string(),
            config: vm.config().clone(),
            paths: vm.paths().clone(),
            vm,
            lock,
        })
    }

    /// A monitor connection when the domain's QEMU runs, `None` when it does
    /// not; a connection QEMU drops at once is tried again for a moment.
    pub(super) async fn running_qmp(&self, dom: &Domain) -> Result<Option<Qmp>> {
        self.connect_if_running(dom, Duration::from_secs(5)).await
    }

    /// Starts QEMU on `disks` and connects to it.
    async fn launch(
        &self,
        dom: &Domain,
        disks: &[DiskChain],
        options: LaunchOptions,
    ) -> Result<Qmp> {
        dom.vm
            .start_with_disks(self.store(), &dom.lock, disks, options)
            .await?;
        Ok(dom.vm.connect_qmp(&dom.lock).await?)
    }

    /// Ends QEMU (its state is being replaced) and waits until it is gone;
    /// a QEMU that exited meanwhile (one a killed vmsnap had already told to
    /// end) is just as good.
    async fn stop_qemu(&self, dom: &Domain, qmp: Qmp) -> Result<()> {
        qmp.close().await;
        match dom.vm.destroy(self.store(), &dom.lock).await {
            Ok(()) => Ok(()),
            Err(err) => match dom.vm.reconcile(self.store(), &dom.lock)? {
                crate::domain::QemuProcess::Alive(_) => Err(err.into()),
                _ => Ok(()),
            },
        }
    }

    /// The domain's snapshot tree (for listing and queries), after checking it exists.
    pub fn tree(&self, domain: &str) -> Result<SnapshotTree> {
        self.config(domain)?;
        let metas = self
            .snaps
            .snapshots(domain)?
            .into_iter()
            .map(|s| s.meta)
            .collect();
        SnapshotTree::new(metas).map_err(|e| SnapshotError::Invalid(e.to_string()))
    }

    /// One stored snapshot or [`SnapshotError::UnknownSnapshot`].
    pub fn get(&self, domain: &str, name: &str) -> Result<StoredSnapshot> {
        self.config(domain)?;
        self.snaps
            .snapshots(domain)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SnapshotError::UnknownSnapshot {
                domain: domain.to_string(),
                name: name.to_string(),
            })
    }

    /// `snapshot-create-as`.
    pub async fn create(
        &self,
        domain: &str,
        request: &CreateRequest,
        progress: ProgressFn<'_>,
    ) -> Result<CreateOutcome> {
        let dom = self.lock(domain)?;
        self.recover_locked(&dom).await?;
        let name = match &request.name {
            Some(name) => name.clone(),
            None => now_unix().to_string(),
        };
        validate_snapshot_name(&name).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let snapshots = self.snaps.snapshots(domain)?;
        if snapshots.iter().any(|s| s.name == name) {
            return Err(SnapshotError::DuplicateName {
                domain: domain.to_string(),
                name,
            });
        }
        let qmp = self.running_qmp(&dom).await?;
        let running_state = match &qmp {
            Some(qmp) => {
                let status = qmp
                    .query_status()
                    .await
                    .map_err(qmp_error(domain, "query-status"))?;
                Some(status.running)
            }
            None => None,
        };
        let chains = self.snaps.chains(domain)?;
        let plan = self.plan_create(&dom, &name, request, &chains, running_state)?;
        let parent = self.snaps.current(domain)?;
        let mut meta = SnapshotMeta {
            name: name.clone(),
            domain: domain.to_string(),
            description: request.description.clone(),
            parent,
            creation_time: now_unix(),
            state: SnapshotState::Shutoff,
            memory: MemorySnapshot::None,
            disks: Vec::new(),
            domain_config: dom.config.to_toml(),
            is_current: false,
        };
        let outcome = match plan {
            CreatePlan::Internal { disks, memory } => {
                self.create_internal(
                    &dom,
                    qmp.as_ref(),
                    &mut meta,
                    &chains,
                    &disks,
                    memory,
                    running_state,
                    progress,
                )
                .await?
            }
            CreatePlan::External {
                disks,
                internal,
                memory_file,
                reused,
            } => {
                self.create_external(
                    &dom,
                    qmp.as_ref(),
                    &mut meta,
                    &chains,
                    &disks,
                    &internal,
                    memory_file,
                    &reused,
                    running_state,
                    progress,
                )
                .await?
            }
        };
        if let Some(qmp) = qmp {
            if request.halt {
                // The snapshot is recorded: a failure here leaves it intact.
                self.stop_qemu(&dom, qmp).await.map_err(|err| {
                    SnapshotError::Conflict(format!(
                        "snapshot {name} of domain {domain} was created, but halting the domain failed: {err}"
                    ))
                })?;
            } else {
                qmp.close().await;
            }
        }
        self.collect_garbage(&dom)?;
        Ok(outcome)
    }

    fn plan_create(
        &self,
        dom: &Domain,
        name: &str,
        request: &CreateRequest,
        chains: &[DiskChain],
        running: Option<bool>,
    ) -> Result<CreatePlan> {
        let live = running.is_some();
        for spec in &request.diskspecs {
            if !chains.iter().any(|c| c.target == spec.target) {
                return Err(SnapshotError::Invalid(format!(
                    "domain {} has no disk {} (--diskspec): see `vmsnap domblklist {}`",
                    dom.name, spec.target, dom.name
                )));
            }
        }
        let mem_mode = request.memspec.as_ref().map(|m| m.mode);
        let any_external_disk = request
            .diskspecs
            .iter()
            .any(|d| d.mode == Some(DiskSnapshotMode::External));
        let any_internal_disk = request
            .diskspecs
            .iter()
            .any(|d| d.mode == Some(DiskSnapshotMode::Internal));
        let external = request.external
            || mem_mode == Some(DiskSnapshotMode::External)
            || any_external_disk
            || (request.disk_only && !any_internal_disk);
        let want_memory = !request.disk_only && mem_mode != Some(DiskSnapshotMode::No) && live;
        if !live && mem_mode.is_some_and(|m| m != DiskSnapshotMode::No) {
            return Err(SnapshotError::Unsupported(format!(
                "domain {} is not running: there is no memory to save; drop --memspec or start it",
                dom.name
            )));
        }
        // Internal disks go with external ones (one QMP transaction switches
        // the one kind and snapshots the other) and with a memory file; only
        // QEMU's internal memory save cannot also switch disks to overlays.
        if external && mem_mode == Some(DiskSnapshotMode::Internal) {
            return Err(SnapshotError::Unsupported(
                "internal memory (snapshot=internal in --memspec) cannot go with external disks: \
                 save the memory to a file (--memspec file=PATH) or make every disk internal"
                    .into(),
            ));
        }
        let mode_of = |target: &str| -> DiskSnapshotMode {
            request
                .diskspecs
                .iter()
                .find(|d| d.target == target)
                .and_then(|d| d.mode)
                .unwrap_or(if external {
                    DiskSnapshotMode::External
                } else {
                    DiskSnapshotMode::Internal
                })
        };
        if !external {
            let mut disks = Vec::new();
            for chain in chains {
                if mode_of(&chain.target) == DiskSnapshotMode::No {
                    continue;
                }
                require_qcow2(dom, chain)?;
                disks.push(chain.target.clone());
            }
            if disks.is_empty() {
                return Err(SnapshotError::Invalid(
                    "no disk is left in the snapshot".into(),
                ));
            }
            return Ok(CreatePlan::Internal {
                disks,
                memory: want_memory,
            });
        }
        let snapshot_dir = dom.paths.dir.join("snapshots");
        let mut disks = Vec::new();
        let mut internal = Vec::new();
        let mut taken = BTreeSet::new();
        let mut reused = BTreeSet::new();
        for chain in chains {
            match mode_of(&chain.target) {
                DiskSnapshotMode::No => continue,
                DiskSnapshotMode::Internal => {
                    require_qcow2(dom, chain)?;
                    internal.push(chain.target.clone());
                    continue;
                }
                DiskSnapshotMode::External => {}
            }
            let explicit = request
                .diskspecs
                .iter()
                .find(|d| d.target == chain.target)
                .and_then(|d| d.file.clone());
            let file = match explicit {
                Some(file) if request.reuse_external && !taken.contains(&file) => {
                    self.check_reuse_candidate(dom, &chain.target, &file)?;
                    reused.insert(file.clone());
                    file
                }
                Some(file) => {
                    if path_taken(&file) || taken.contains(&file) {
                        return Err(SnapshotError::FileExists {
                            what: format!("overlay for disk {}", chain.target),
                            path: file,
                        });
                    }
                    file
                }
                None => unique_file(
                    &snapshot_dir,
                    &format!("{}.{name}", chain.target),
                    "qcow2",
                    &taken,
                ),
            };
            taken.insert(file.clone());
            disks.push((chain.target.clone(), file));
        }
        if disks.is_empty() && internal.is_empty() {
            return Err(SnapshotError::Invalid(
                "no disk is left in the snapshot".into(),
            ));
        }
        let memory_file = if want_memory {
            match request.memspec.as_ref().and_then(|m| m.file.clone()) {
                Some(file) => {
                    if path_taken(&file) || taken.contains(&file) {
                        return Err(SnapshotError::FileExists {
                            what: "memory image".into(),
                            path: file,
                        });
                    }
                    Some(file)
                }
                None => Some(unique_file(&snapshot_dir, name, "mem", &taken)),
            }
        } else {
            None
        };
        Ok(CreatePlan::External {
            disks,
            internal,
            memory_file,
            reused,
        })
    }

    /// `--reuse-external`, before anything is touched: the file must
    /// exist as a regular file (never through a symlink) that no recorded
    /// chain or snapshot of the domain uses; its contents are checked once
    /// the active image's size is known ([`check_reusable_overlay`]).
    fn check_reuse_candidate(&self, dom: &Domain, target: &str, file: &Path) -> Result<()> {
        let refuse = |why: &str| Err(reuse_refused(target, file, why));
        match std::fs::symlink_metadata(file) {
            Ok(meta) if meta.file_type().is_file() => {}
            Ok(_) => return refuse("it is not a regular file"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return refuse(
                    "it does not exist; create it first (vmsnap img create -f qcow2 -b IMAGE -F FORMAT FILE) \
                     or drop --reuse-external to let vmsnap create it",
                )
            }
            Err(err) => return Err(io_error("cannot inspect", file)(err)),
        }
        let current = chains_of(&self.snaps.chains(&dom.name)?);
        let snapshots = self.snaps.snapshots(&dom.name)?;
        if needed_files(&current, &snapshots).contains(file)
            || self.snaps.owned_files(&dom.name)?.iter().any(|f| f == file)
        {
            return refuse(&format!(
                "domain {} already uses it for a disk or a snapshot",
                dom.name
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_internal(
        &self,
        dom: &Domain,
        qmp: Option<&Qmp>,
        meta: &mut SnapshotMeta,
        chains: &[DiskChain],
        disks: &[String],
        memory: bool,
        running: Option<bool>,
        progress: ProgressFn<'_>,
    ) -> Result<CreateOutcome> {
        let name = meta.name.clone();
        let mut intent = Intent::new(Operation::Create, &name);
        let mut storage = SnapshotStorage::default();
        let mut node_names = Vec::new();
        for chain in chains {
            let active = chain.active().expect("recorded chains are never empty");
            let included = disks.contains(&chain.target);
            if included {
                intent.new_tags.push((active.path.clone(), name.clone()));
                node_names.push(active.node_name.clone());
                storage.disks.insert(
                    chain.target.clone(),
                    DiskCapture::Internal {
                        chain: chain_of(chain),
                        tag: name.clone(),
                    },
                );
            } else {
                storage
                    .disks
                    .insert(chain.target.clone(), DiskCapture::Excluded);
            }
            let mode = if included {
                DiskSnapshotMode::Internal
            } else {
                DiskSnapshotMode::No
            };
            meta.disks
                .push(disk_record(&chain.target, active, mode, None));
        }
        // A tag left in an image by someone else would make QEMU refuse or,
        // offline, shadow ours: refuse before touching anything.
        for (image, tag) in &intent.new_tags {
            let present = match qmp {
                Some(qmp) => {
                    let node = chains
                        .iter()
                        .filter_map(|c| c.active())
                        .find(|l| &l.path == image)
                        .map(|l| l.node_name.clone())
                        .unwrap_or_default();
                    offline::live_has_tag(&dom.name, qmp, &node, tag).await?
                }
                None => offline::has_tag(image, tag)?,
            };
            if present {
                return Err(SnapshotError::Conflict(format!(
                    "image {} already holds an internal snapshot named '{tag}' that vmsnap did not record: \
                     remove it (vmsnap img snapshot -d) or choose another name",
                    image.display()
                )));
            }
        }
        let id = self.snaps.begin(&dom.name, &intent)?;
        let mut pause_ms = None;
        match qmp {
            Some(qmp) if memory => {
                let vmstate = node_names[0].clone();
                let mut events = qmp.events();
                progress(Progress {
                    step: "saving memory and disks",
                    done: 0,
                    total: 0,
                });
                intent.step = "snapshot-save".into();
                self.snaps.step(id, &intent)?;
                let job = job_id("save");
                qmp.execute(
                    "snapshot-save",
                    Some(json!({"job-id": job, "tag": name, "vmstate": vmstate, "devices": node_names})),
                )
                .await
                .map_err(qmp_error(&dom.name, "snapshot-save"))?;
                qmp.wait_job(&job, JOB_TIMEOUT)
                    .await
                    .map_err(qmp_error(&dom.name, "snapshot-save"))?;
                progress(Progress {
                    step: "saving memory and disks",
                    done: 1,
                    total: 1,
                });
                pause_ms = pause_from_events(&mut events);
                meta.state = if running == Some(true) {
                    SnapshotState::Running
                } else {
                    SnapshotState::Paused
                };
                meta.memory = MemorySnapshot::Internal {
                    vmstate_disk: disks[0].clone(),
                };
            }
            Some(qmp) => {
                intent.step = "transaction blockdev-snapshot-internal-sync".into();
                self.snaps.step(id, &intent)?;
                let actions: Vec<Value> = node_names
                    .iter()
                    .map(|node| {
                        json!({"type": "blockdev-snapshot-internal-sync",
                               "data": {"device": node, "name": name}})
                    })
                    .collect();
                qmp.execute("transaction", Some(json!({"actions": actions})))
                    .await
                    .map_err(qmp_error(&dom.name, "transaction"))?;
                meta.state = SnapshotState::DiskSnapshot;
            }
            None => {
                intent.step = "create internal snapshots offline".into();
                self.snaps.step(id, &intent)?;
                for (done, (image, tag)) in intent.new_tags.iter().enumerate() {
                    let Err(failure) = offline::create_tag(image, tag) else {
                        continue;
                    };
                    // Refused before writing (a corrupt image, a name taken): take
                    // back the tags made in the images before it and close the
                    // entry here, so recovery never repairs an image nobody changed.
                    if !failure.image_changed
                        && intent.new_tags[..done]
                            .iter()
                            .all(|(image, tag)| offline::delete_tag_if_present(image, tag).is_ok())
                    {
                        self.snaps.close(id)?;
                    }
                    return Err(*failure.error);
                }
                meta.state = SnapshotState::Shutoff;
            }
        }
        meta.validate()
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let change = Change {
            put: vec![(meta.clone(), storage)],
            current: Some(Some(name.clone())),
            ..Change::default()
        };
        self.snaps
            .commit(&dom.name, id, Operation::Create, &change, None)?;
        Ok(CreateOutcome {
            name,
            kind: meta.kind(),
            pause_ms,
            background: false,
            notes: Vec::new(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_external(
        &self,
        dom: &Domain,
        qmp: Option<&Qmp>,
        meta: &mut SnapshotMeta,
        chains: &[DiskChain],
        disks: &[(String, PathBuf)],
        internal: &[String],
        memory_file: Option<PathBuf>,
        reused: &BTreeSet<PathBuf>,
        running: Option<bool>,
        progress: ProgressFn<'_>,
    ) -> Result<CreateOutcome> {
        let name = meta.name.clone();
        // A reused overlay is the caller's until the snapshot holds it: a
        // failed or interrupted attempt must never remove it.
        let mut files: Vec<PathBuf> = disks
            .iter()
            .map(|(_, f)| f.clone())
            .filter(|f| !reused.contains(f))
            .collect();
        files.extend(memory_file.clone());
        let mut intent = Intent::new(Operation::Create, &name);
        self.snaps.own(&dom.name, &files)?;
        let id = self.snaps.begin(&dom.name, &intent)?;
        let mut undo = ExternalUndo::default();
        let result = self
            .create_external_steps(
                dom,
                qmp,
                meta,
                chains,
                disks,
                internal,
                memory_file.as_deref(),
                reused,
                running,
                progress,
                id,
                &mut intent,
                &mut undo,
            )
            .await;
        let err = match result {
            Ok((storage, new_chains, mut outcome)) => {
                let change = Change {
                    put: vec![(meta.clone(), storage)],
                    current: Some(Some(name)),
                    chains: new_chains,
                    ..Change::default()
                };
                match self
                    .snaps
                    .commit(&dom.name, id, Operation::Create, &change, None)
                {
                    Ok(()) => {
                        // Now part of the domain's chain, merged and freed
                        // like vmsnap's own overlays; unrecorded, it would
                        // only ever be kept.
                        let reused: Vec<PathBuf> = reused.iter().cloned().collect();
                        if let Err(err) = self.snaps.own(&dom.name, &reused) {
                            outcome.notes.push(format!(
                                "the reused overlays stay the caller's to remove: {err}"
                            ));
                        }
                        return Ok(outcome);
                    }
                    Err(err) => err,
                }
            }
            Err(err) => err,
        };
        let undone = self
            .undo_external(dom, qmp, chains, &files, running, &undo)
            .await;
        self.snaps.close(id)?;
        match undone {
            Ok(()) => Err(err),
            Err(undo_err) => Err(SnapshotError::Conflict(format!(
                "{err}; putting domain {} back failed too: {undo_err}",
                dom.name
            ))),
        }
    }

    /// Puts everything back after a failed external snapshot: the guest's
    /// run state, its disks (active commit of the new overlays), the block
    /// nodes the attempt added, and the files it made; nothing of the
    /// attempt stays recorded. Files QEMU still writes to (only when the
    /// disks could not be put back) stay, recorded as the live chain.
    async fn undo_external(
        &self,
        dom: &Domain,
        qmp: Option<&Qmp>,
        old_chains: &[DiskChain],
        planned: &[PathBuf],
        running: Option<bool>,
        undo: &ExternalUndo,
    ) -> Result<()> {
        let mut outcome = Ok(());
        // Overlays QEMU may still write to, whatever the records say.
        let mut kept: BTreeSet<PathBuf> = BTreeSet::new();
        if let Some(qmp) = qmp {
            if undo.background {
                let _ = qmp
                    .migrate_set_capabilities(&[("background-snapshot", false)])
                    .await;
            }
            if let Err(err) = restore_run_state(&dom.name, qmp, running == Some(true)).await {
                outcome = Err(err);
            }
            if !undo.switched.is_empty() {
                if let Err(err) = self.unswitch(dom, qmp, &undo.switched, old_chains).await {
                    let mut notes = Vec::new();
                    let _ = self.adopt_live_chains(dom, qmp, &mut notes).await;
                    kept.extend(undo.switched.iter().map(|(_, _, file)| file.clone()));
                    outcome = outcome.and(Err(err));
                }
            }
            let recorded = self.snaps.chains(&dom.name)?;
            for node in &undo.added_nodes {
                let in_use = recorded
                    .iter()
                    .any(|c| c.layers.iter().any(|l| &l.node_name == node));
                if !in_use {
                    let _ = qmp
                        .execute("blockdev-del", Some(json!({"node-name": node})))
                        .await;
                    let _ = qmp
                        .execute(
                            "blockdev-del",
                            Some(json!({"node-name": file_node_name(node)})),
                        )
                        .await;
                }
            }
        }
        for (image, tag) in &undo.tags {
            if let Err(err) = self.delete_tag(dom, qmp, image, tag).await {
                outcome = outcome.and(Err(err));
            }
        }
        kept.extend(
            self.snaps
                .chains(&dom.name)?
                .iter()
                .flat_map(|c| c.layers.iter().map(|l| l.path.clone())),
        );
        for file in &undo.created {
            if kept.contains(file) {
                continue;
            }
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    kept.insert(file.clone());
                    outcome = outcome.and(Err(SnapshotError::Io {
                        action: "cannot remove".into(),
                        path: file.clone(),
                        source: err,
                    }));
                }
            }
        }
        // What stays is still vmsnap's to clean up later; a planned file
        // this attempt never made is not vmsnap's, so it is released too.
        let released: Vec<PathBuf> = planned
            .iter()
            .filter(|f| !kept.contains(*f))
            .cloned()
            .collect();
        self.snaps.disown(&dom.name, &released)?;
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_external_steps(
        &self,
        dom: &Domain,
        qmp: Option<&Qmp>,
        meta: &mut SnapshotMeta,
        chains: &[DiskChain],
        disks: &[(String, PathBuf)],
        internal: &[String],
        memory_file: Option<&Path>,
        reused: &BTreeSet<PathBuf>,
        running: Option<bool>,
        progress: ProgressFn<'_>,
        id: i64,
        intent: &mut Intent,
        undo: &mut ExternalUndo,
    ) -> Result<(SnapshotStorage, Vec<DiskChain>, CreateOutcome)> {
        let name = meta.name.clone();
        let mut storage = SnapshotStorage::default();
        let mut new_chains = Vec::new();
        let mut notes = Vec::new();
        // 1. Overlays, made before the guest is paused.
        intent.step = "create overlays".into();
        self.snaps.step(id, intent)?;
        let mut switches = Vec::new();
        let mut internal_nodes = Vec::new();
        for chain in chains {
            let active = chain.active().expect("recorded chains are never empty");
            if internal.contains(&chain.target) {
                // Snapshotted inside its qcow2 image at the same instant.
                intent.new_tags.push((active.path.clone(), name.clone()));
                internal_nodes.push(active.node_name.clone());
                storage.disks.insert(
                    chain.target.clone(),
                    DiskCapture::Internal {
                        chain: chain_of(chain),
                        tag: name.clone(),
                    },
                );
                meta.disks.push(disk_record(
                    &chain.target,
                    active,
                    DiskSnapshotMode::Internal,
                    None,
                ));
                continue;
            }
            let Some((_, file)) = disks.iter().find(|(t, _)| t == &chain.target) else {
                storage
                    .disks
                    .insert(chain.target.clone(), DiskCapture::Excluded);
                meta.disks.push(disk_record(
                    &chain.target,
                    active,
                    DiskSnapshotMode::No,
                    None,
                ));
                continue;
            };
            if let Some(parent) = file.parent() {
                create_private_dir(parent)?;
            }
            let size = match qmp {
                Some(qmp) => offline::live_virtual_size(&dom.name, qmp, &active.node_name).await?,
                None => offline::virtual_size(&Layer::new(active.path.clone(), active.format))?,
            };
            if reused.contains(file) {
                check_reusable_overlay(&chain.target, file, active, size)?;
            } else {
                offline::create_overlay(
                    file,
                    &Layer::new(active.path.clone(), active.format),
                    size,
                )?;
                undo.created.push(file.clone());
            }
            let node = node_name_for(&chain.target, file);
            let frozen = chain_of(chain);
            storage.disks.insert(
                chain.target.clone(),
                DiskCapture::External {
                    chain: frozen.clone(),
                },
            );
            meta.disks.push(disk_record(
                &chain.target,
                active,
                DiskSnapshotMode::External,
                Some(file),
            ));
            let mut new_chain = chain.clone();
            new_chain.layers.insert(
                0,
                crate::disk::DiskLayer {
                    path: file.clone(),
                    format: DiskFormat::Qcow2,
                    node_name: node.clone(),
                },
            );
            new_chains.push(new_chain);
            switches.push((active.node_name.clone(), node, file.clone()));
        }
        let Some(qmp) = qmp else {
            if memory_file.is_some() {
                return Err(SnapshotError::Unsupported(format!(
                    "domain {} is not running: there is no memory to save",
                    dom.name
                )));
            }
            if !intent.new_tags.is_empty() {
                intent.step = "create internal snapshots offline".into();
                self.snaps.step(id, intent)?;
                for (image, tag) in &intent.new_tags {
                    // Even a failed create may have left part of a tag behind.
                    undo.tags.push((image.clone(), tag.clone()));
                    offline::create_tag(image, tag).map_err(|failure| *failure.error)?;
                }
            }
            meta.state = SnapshotState::Shutoff;
            meta.validate()
                .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
            let outcome = CreateOutcome {
                name,
                kind: meta.kind(),
                pause_ms: None,
                background: false,
                notes,
            };
            return Ok((storage, new_chains, outcome));
        };
        // The memory image gets all the room its stream can take before
        // anything is paused or switched: QEMU 7.2 never lifts the write
        // protection of a background snapshot that fails mid-stream, which
        // freezes the guest for good, so a full disk must refuse here.
        let memory_image = match memory_file {
            Some(file) => {
                if let Some(parent) = file.parent() {
                    create_private_dir(parent)?;
                }
                let bound = memory_stream_bound(dom, qmp).await;
                let image = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode_private()
                    .open(file)
                    .map_err(io_error("cannot create memory image", file))?;
                undo.created.push(file.to_path_buf());
                reserve_memory_image(&dom.name, file, &image, bound)?;
                Some(image)
            }
            None => None,
        };
        // 2. Open the overlays in QEMU, with no backing (the transaction links them).
        for (_, node, file) in &switches {
            let path = file.to_str().ok_or_else(|| {
                SnapshotError::Invalid(format!("overlay path {} is not UTF-8", file.display()))
            })?;
            undo.added_nodes.push(node.clone());
            qmp.execute(
                "blockdev-add",
                Some(
                    json!({"driver": "file", "node-name": file_node_name(node), "filename": path, "discard": "unmap"}),
                ),
            )
            .await
            .map_err(qmp_error(&dom.name, "blockdev-add"))?;
            qmp.execute(
                "blockdev-add",
                Some(json!({"driver": "qcow2", "node-name": node, "file": file_node_name(node), "backing": null})),
            )
            .await
            .map_err(qmp_error(&dom.name, "blockdev-add"))?;
        }
        let was_running = running == Some(true);
        let mut background = false;
        if memory_file.is_some() {
            if was_running {
                match qmp
                    .migrate_set_capabilities(&[("background-snapshot", true)])
                    .await
                {
                    Ok(()) => background = true,
                    Err(err) => notes.push(format!(
                        "QEMU refused background-snapshot ({err}); memory was saved with the guest paused"
                    )),
                }
            } else {
                let _ = qmp
                    .migrate_set_capabilities(&[("background-snapshot", false)])
                    .await;
            }
        }
        undo.background = background;
        if background && !dom.config.hugepages {
            // Outside the pause: huge pages make QEMU's walk over guest RAM
            // inside it several times shorter (see `hugepages`). Guest RAM
            // from the hugetlb pool is in huge pages already.
            if let Ok(crate::domain::QemuProcess::Alive(pid)) = dom.vm.process() {
                let ram = dom.config.memory_mib << 20;
                let _ =
                    tokio::task::spawn_blocking(move || super::hugepages::fold_guest_ram(pid, ram))
                        .await;
            }
        }
        // 3. The paused window is journalled as one step before it starts,
        // so nothing waits for the store while the guest is stopped: stop,
        // switch every disk in one transaction, start the memory save (with
        // background-snapshot QEMU resumes the guest once it is set up).
        intent.step = if memory_file.is_some() {
            "stop, switch disks, save memory".into()
        } else {
            "stop, switch disks".into()
        };
        intent.paused_guest = was_running;
        self.snaps.step(id, intent)?;
        // The transaction flushes the old top layers while the guest is
        // stopped; write back what the host still caches first, so that
        // flush (and the pause) stays short.
        for (_, _, file) in &switches {
            sync_filesystem(file);
        }
        let mut events = qmp.events();
        // The window runs on the second monitor, which can take the memory
        // image's descriptor: QEMU then needs no shell while the guest waits.
        let actions: Vec<Value> = switches
            .iter()
            .map(|(top, overlay, _)| json!({"type": "blockdev-snapshot", "data": {"node": top, "overlay": overlay}}))
            .chain(internal_nodes.iter().map(|node| {
                json!({"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": name}})
            }))
            .collect();
        let mut monitor = FdMonitor::connect(&dom.name, &dom.paths.query_socket)?;
        if let Some(image) = &memory_image {
            monitor.pass_fd(MEMORY_FD_NAME, image)?;
        }
        if was_running {
            monitor.execute("stop", Value::Null)?;
            failpoint(Operation::Create, "stopped");
        }
        let switched = monitor.execute("transaction", json!({"actions": actions}));
        failpoint(Operation::Create, "switched");
        if let Err(err) = switched {
            if memory_image.is_some() {
                let _ = monitor.execute("closefd", json!({"fdname": MEMORY_FD_NAME}));
            }
            return Err(err);
        }
        undo.switched = switches.clone();
        undo.tags = intent.new_tags.clone();
        let started = match memory_image {
            Some(_) => monitor
                .execute("migrate", json!({"uri": format!("fd:{MEMORY_FD_NAME}")}))
                .map(|_| ()),
            None => Ok(()),
        };
        if started.is_err() {
            let _ = monitor.execute("closefd", json!({"fdname": MEMORY_FD_NAME}));
        }
        drop(monitor);
        // QEMU writes to the overlays now: record the chains (a recovery
        // would adopt them from QEMU, too).
        self.snaps.apply(
            &dom.name,
            &Change {
                chains: new_chains.clone(),
                ..Change::default()
            },
        )?;
        started?;
        let mut pause_ms = None;
        if let (Some(file), Some(image)) = (memory_file, &memory_image) {
            let info =
                wait_migration_with_progress(&dom.name, qmp, "saving memory", progress).await?;
            if background {
                let _ = qmp
                    .migrate_set_capabilities(&[("background-snapshot", false)])
                    .await;
                undo.background = false;
            }
            // A memory image only counts once it is on disk, without the
            // room reserved beyond the stream.
            finish_memory_image(file, image)?;
            if background {
                pause_ms = pause_from_events(&mut events);
                intent.paused_guest = false;
                if pause_ms.is_none() {
                    pause_ms = info.downtime.map(|d| d as f64);
                }
            }
            meta.memory = MemorySnapshot::External {
                path: file.to_path_buf(),
            };
            meta.state = if was_running {
                SnapshotState::Running
            } else {
                SnapshotState::Paused
            };
        } else {
            meta.state = SnapshotState::DiskSnapshot;
        }
        // 4. Back to the state the guest was in.
        let status = qmp
            .query_status()
            .await
            .map_err(qmp_error(&dom.name, "query-status"))?;
        if was_running && !status.running {
            qmp.cont().await.map_err(qmp_error(&dom.name, "cont"))?;
            if pause_ms.is_none() {
                pause_ms = pause_from_events(&mut events);
            }
        } else if !was_running && status.status == QemuRunState::PostMigrate {
            // A completed migration leaves the images inactive; only `cont`
            // re-activates them in QEMU 7.2, so run and stop at once.
            qmp.cont().await.map_err(qmp_error(&dom.name, "cont"))?;
            qmp.stop().await.map_err(qmp_error(&dom.name, "stop"))?;
        }
        intent.paused_guest = false;
        meta.validate()
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let outcome = CreateOutcome {
            name,
            kind: meta.kind(),
            pause_ms,
            background,
            notes,
        };
        Ok((storage, new_chains, outcome))
    }
}

/// What a failed external snapshot has to undo.
#[derive(Default)]
struct ExternalUndo {
    /// Files this attempt created (overlays, the memory image).
    created: Vec<PathBuf>,
    /// Overlay format nodes added to QEMU (each on its file node).
    added_nodes: Vec<String>,
    /// (old top node, overlay node, overlay file) of every disk the
    /// transaction switched.
    switched: Vec<(String, String, PathBuf)>,
    /// Whether QEMU's background-snapshot capability was turned on.
    background: bool,
    /// Internal snapshots (image, tag) this attempt made in disks that
    /// were snapshotted internally beside the external ones.
    tags: Vec<(PathBuf, String)>,
}

/// Brings the guest back to running (`was_running`) or paused after a
/// failed snapshot, re-activating images a completed migration left inactive.
async fn restore_run_state(domain: &str, qmp: &Qmp, was_running: bool) -> Result<()> {
    let status = qmp
        .query_status()
        .await
        .map_err(qmp_error(domain, "query-status"))?;
    if status.status == QemuRunState::PostMigrate || (was_running && !status.running) {
        qmp.cont().await.map_err(qmp_error(domain, "cont"))?;
    }
    let status = qmp
        .query_status()
        .await
        .map_err(qmp_error(domain, "query-status"))?;
    if !was_running && status.running {
        qmp.stop().await.map_err(qmp_error(domain, "stop"))?;
    }
    Ok(())
}

/// Room kept in a memory image for device state beyond the RAM pages.
const DEVICE_STATE_ROOM: u64 = 32 << 20;

/// An upper bound of the bytes QEMU writes when it saves the domain's
/// memory: every page of every RAM block (guest RAM, video memory, ROMs)
/// with its page header and block name, plus room for the device state.
async fn memory_stream_bound(dom: &Domain, qmp: &Qmp) -> u64 {
    const PAGE: u64 = 4096;
    let listing = qmp
        .execute(
            "human-monitor-command",
            Some(json!({"command-line": "info ramblock"})),
        )
        .await;
    let blocks = match &listing {
        Ok(Value::String(text)) => ram_blocks(text),
        _ => Vec::new(),
    };
    if blocks.is_empty() {
        // QEMU did not list its RAM blocks: the configured RAM plus
        // generous room for video memory and ROMs.
        let ram = dom.config.memory_mib << 20;
        return ram + ram / 16 + (256 << 20);
    }
    let longest_name = blocks
        .iter()
        .map(|(n, _)| n.len() as u64)
        .max()
        .unwrap_or(0);
    let pages: u64 = blocks.iter().map(|(_, used)| used.div_ceil(PAGE)).sum();
    // Each page: an 8-byte header, at worst the block's name (length byte
    // and text), and the page itself.
    pages * (PAGE + 8 + 1 + longest_name) + DEVICE_STATE_ROOM
}

/// The (name, used bytes) of every RAM block in HMP's `info ramblock`
/// table ("Block Name  PSize  Offset  Used  Total ...", numbers in hex).
fn ram_blocks(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let offset = tokens.iter().position(|t| t.starts_with("0x"))?;
            let used = tokens.get(offset + 1)?.strip_prefix("0x")?;
            let used = u64::from_str_radix(used, 16).ok()?;
            Some((tokens.first()?.to_string(), used))
        })
        .collect()
}

/// Reserves `bytes` for the memory image `file` (open as `image`), so its
/// stream can never fail for lack of space; refuses in one line saying how
/// much room is missing. A file system that cannot reserve (fallocate
/// unsupported, e.g. NFSv3) is trusted with its free space instead of
/// being filled with zeros.
fn reserve_memory_image(
    domain: &str,
    file: &Path,
    image: &std::fs::File,
    bytes: u64,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = file.parent().unwrap_or(Path::new("/"));
    let free = free_bytes(dir);
    let len = libc::off_t::try_from(bytes).unwrap_or(libc::off_t::MAX);
    let errno = loop {
        // SAFETY: fallocate only uses the descriptor, valid while `image` lives.
        if unsafe { libc::fallocate(image.as_raw_fd(), 0, 0, len) } == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            other => break other.unwrap_or(libc::EIO),
        }
    };
    let no_space = match errno {
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => true,
        libc::EOPNOTSUPP => free.is_some_and(|f| f < bytes),
        _ => false,
    };
    if errno == libc::EOPNOTSUPP && !no_space {
        return Ok(());
    }
    let mib = |b: u64| b.div_ceil(1 << 20);
    let source = if no_space {
        std::io::Error::other(format!(
            "no space left on {} (domain {domain} needs {} MiB there, {} MiB are free): \
             free some space or choose another --memspec file",
            dir.display(),
            mib(bytes),
            free.map_or_else(|| "?".to_string(), |f| mib(f).to_string()),
        ))
    } else {
        std::io::Error::from_raw_os_error(errno)
    };
    Err(SnapshotError::Io {
        action: "cannot reserve room for memory image".into(),
        path: file.to_path_buf(),
        source,
    })
}

/// The bytes an unprivileged writer may still use on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, filled in by the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    let free = u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize));
    Some(free)
}

/// Cuts a saved memory image to the stream QEMU wrote through the shared
/// descriptor (dropping the reserved room past it) and makes it durable.
fn finish_memory_image(file: &Path, image: &std::fs::File) -> Result<()> {
    use std::io::Seek;
    let mut handle = image;
    let written = handle
        .stream_position()
        .map_err(io_error("cannot read the length of memory image", file))?;
    if written == 0 {
        return Err(SnapshotError::Conflict(format!(
            "QEMU wrote nothing to memory image {}",
            file.display()
        )));
    }
    image
        .set_len(written)
        .map_err(io_error("cannot trim memory image", file))?;
    image
        .sync_all()
        .map_err(io_error("cannot write to disk", file))?;
    if let Some(dir) = file.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// What a revert did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RevertOutcome {
    /// The snapshot reverted to.
    pub name: String,
    /// The guest's state afterwards: running, paused or shutoff.
    pub state: String,
    /// Notes for the user.
    pub notes: Vec<String>,
}

/// What a delete did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeleteOutcome {
    /// Snapshots removed, children first.
    pub removed: Vec<String>,
    /// Images merged away to give storage back.
    pub merged: Vec<PathBuf>,
    /// Notes for the user.
    pub notes: Vec<String>,
}

enum DiskAction {
    Keep,
    Overlay {
        file: PathBuf,
        backing: Layer,
    },
    Clone {
        from: PathBuf,
        to: PathBuf,
        tag: String,
    },
    Apply {
        image: PathBuf,
        tag: String,
    },
}

impl<'a> Orchestrator<'a> {
    /// `snapshot-revert`.
    pub async fn revert(
        &self,
        domain: &str,
        name: &str,
        mode: RevertMode,
        progress: ProgressFn<'_>,
    ) -> Result<RevertOutcome> {
        let dom = self.lock(domain)?;
        let notes = self.recover_locked(&dom).await?;
        self.revert_locked(&dom, name, mode, progress, notes).await
    }

    /// [`Self::revert`] on a locked, recovered domain (recovery also uses it
    /// to finish a revert a killed vmsnap had begun); `notes` so far go first.
    pub(super) async fn revert_locked(
        &self,
        dom: &Domain,
        name: &str,
        mode: RevertMode,
        progress: ProgressFn<'_>,
        mut notes: Vec<String>,
    ) -> Result<RevertOutcome> {
        let domain = dom.name.as_str();
        let snapshots = self.snaps.snapshots(domain)?;
        let target = snapshots
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| SnapshotError::UnknownSnapshot {
                domain: domain.to_string(),
                name: name.to_string(),
            })?;
        let mut required: Vec<PathBuf> = target
            .storage
            .image_files()
            .map(Path::to_path_buf)
            .collect();
        if let MemorySnapshot::External { path } = &target.meta.memory {
            required.push(path.clone());
        }
        for file in required {
            if !file.exists() {
                return Err(SnapshotError::MissingFile {
                    domain: domain.to_string(),
                    snapshot: name.to_string(),
                    path: file,
                });
            }
        }
        let want = match (mode, target.meta.state) {
            (RevertMode::Running, _) => SnapshotState::Running,
            (RevertMode::Paused, _) => SnapshotState::Paused,
            (RevertMode::AsRecorded, SnapshotState::Running) => SnapshotState::Running,
            (RevertMode::AsRecorded, SnapshotState::Paused) => SnapshotState::Paused,
            (RevertMode::AsRecorded, _) => SnapshotState::Shutoff,
        };
        let chains = self.snaps.chains(domain)?;
        let snapshot_dir = dom.paths.dir.join("snapshots");
        let mut taken = BTreeSet::new();
        let mut actions = Vec::new();
        let mut new_chains = Vec::new();
        for chain in &chains {
            let capture = target
                .storage
                .disks
                .get(&chain.target)
                .cloned()
                .unwrap_or(DiskCapture::Excluded);
            let (action, new_chain) = match capture {
                DiskCapture::Excluded => (DiskAction::Keep, chain_of(chain)),
                DiskCapture::External { chain: frozen } => {
                    let file = unique_file(
                        &snapshot_dir,
                        &format!("{}.{name}.run", chain.target),
                        "qcow2",
                        &taken,
                    );
                    taken.insert(file.clone());
                    let backing = frozen.top().clone();
                    (
                        DiskAction::Overlay {
                            file: file.clone(),
                            backing,
                        },
                        frozen.with_top(Layer::new(file, DiskFormat::Qcow2)),
                    )
                }
                DiskCapture::Internal { chain: held, tag } => {
                    let image = held.top().file.clone();
                    if live_content_needed(&image, None, &snapshots) {
                        let file = unique_file(
                            &snapshot_dir,
                            &format!("{}.{name}.clone", chain.target),
                            "qcow2",
                            &taken,
                        );
                        taken.insert(file.clone());
                        (
                            DiskAction::Clone {
                                from: image,
                                to: file.clone(),
                                tag,
                            },
                            held.replace_top(Layer::new(file, DiskFormat::Qcow2)),
                        )
                    } else {
                        (DiskAction::Apply { image, tag }, held)
                    }
                }
            };
            actions.push((chain.target.clone(), action));
            new_chains.push((chain.target.clone(), new_chain));
        }
        let new_files: Vec<PathBuf> = taken.iter().cloned().collect();
        if !new_files.is_empty() {
            create_private_dir(&snapshot_dir)?;
        }
        self.snaps.own(domain, &new_files)?;
        let mut intent = Intent::new(Operation::Revert, name);
        intent.revert_mode = mode;
        let id = self.snaps.begin(domain, &intent)?;
        let qmp = self.running_qmp(dom).await?;
        let same_images = new_chains.iter().all(|(target, chain)| {
            chains
                .iter()
                .find(|c| &c.target == target)
                .is_some_and(|c| chain_of(c) == *chain)
        });
        let result = match (&target.meta.memory, qmp) {
            // Fast path: QEMU already runs on the images holding the snapshot.
            (MemorySnapshot::Internal { vmstate_disk }, Some(qmp))
                if same_images
                    && actions
                        .iter()
                        .all(|(_, a)| matches!(a, DiskAction::Apply { .. } | DiskAction::Keep)) =>
            {
                intent.step = "snapshot-load".into();
                self.snaps.step(id, &intent)?;
                let r = self
                    .load_internal(dom, &qmp, &chains, &target, vmstate_disk, want, progress)
                    .await;
                qmp.close().await;
                r.map(|_| chains.clone())
            }
            (_, qmp) => {
                if let Some(qmp) = qmp {
                    intent.step = "stop QEMU".into();
                    self.snaps.step(id, &intent)?;
                    self.stop_qemu(dom, qmp).await?;
                }
                intent.step = "prepare images".into();
                self.snaps.step(id, &intent)?;
                // QEMU's snapshot-load applies the tags itself; with a memory
                // file (or none) the images must hold the snapshot before start.
                let loads_internal = matches!(target.meta.memory, MemorySnapshot::Internal { .. });
                for (_, action) in &actions {
                    match action {
                        DiskAction::Keep => {}
                        DiskAction::Overlay { file, backing } => {
                            let size = offline::virtual_size(backing)?;
                            offline::create_overlay(file, backing, size)?;
                        }
                        DiskAction::Clone { from, to, tag } => {
                            offline::clone_image(from, to)?;
                            if !loads_internal {
                                // With snapshot-load, QEMU drops the copies itself
                                // after starting, so their space becomes holes.
                                offline::delete_tags_except(to, tag)?;
                                offline::apply_tag(to, tag)?;
                                offline::delete_tag_if_present(to, tag)?;
                            }
                        }
                        DiskAction::Apply { image, tag } => {
                            if !loads_internal {
                                offline::apply_tag(image, tag)?;
                            }
                        }
                    }
                }
                let disk_chains: Vec<DiskChain> = new_chains
                    .iter()
                    .map(|(target, chain)| disk_chain_of(target, chain, None))
                    .collect();
                self.revert_start(
                    dom,
                    &disk_chains,
                    &target,
                    &actions,
                    want,
                    &mut intent,
                    id,
                    progress,
                )
                .await
                .map(|_| disk_chains)
            }
        };
        match result {
            Ok(disk_chains) => {
                let change = Change {
                    current: Some(Some(name.to_string())),
                    chains: disk_chains,
                    ..Change::default()
                };
                self.snaps
                    .commit(domain, id, Operation::Revert, &change, None)?;
            }
            Err(err) => {
                let qmp = self.running_qmp(dom).await.ok().flatten();
                if let Some(qmp) = &qmp {
                    let _ = self.adopt_live_chains(dom, qmp, &mut notes).await;
                }
                self.snaps.close(id)?;
                self.collect_garbage(dom)?;
                return Err(err);
            }
        }
        notes.extend(self.collect_garbage(dom)?);
        Ok(RevertOutcome {
            name: name.to_string(),
            state: want.as_str().to_string(),
            notes,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn load_internal(
        &self,
        dom: &Domain,
        qmp: &Qmp,
        chains: &[DiskChain],
        target: &StoredSnapshot,
        vmstate_disk: &str,
        want: SnapshotState,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let mut devices = Vec::new();
        let mut vmstate = None;
        for chain in chains {
            if matches!(
                target.storage.disks.get(&chain.target),
                Some(DiskCapture::Internal { .. })
            ) {
                let node = chain.active().expect("never empty").node_name.clone();
                if chain.target == vmstate_disk {
                    vmstate = Some(node.clone());
                }
                devices.push(node);
            }
        }
        let vmstate = vmstate.unwrap_or_else(|| devices[0].clone());
        progress(Progress {
            step: "loading memory and disks",
            done: 0,
            total: 0,
        });
        let job = job_id("load");
        qmp.execute(
            "snapshot-load",
            Some(
                json!({"job-id": job, "tag": target.name, "vmstate": vmstate, "devices": devices}),
            ),
        )
        .await
        .map_err(qmp_error(&dom.name, "snapshot-load"))?;
        qmp.wait_job(&job, JOB_TIMEOUT)
            .await
            .map_err(qmp_error(&dom.name, "snapshot-load"))?;
        progress(Progress {
            step: "loading memory and disks",
            done: 1,
            total: 1,
        });
        set_run_state(&dom.name, qmp, want).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn revert_start(
        &self,
        dom: &Domain,
        disk_chains: &[DiskChain],
        target: &StoredSnapshot,
        actions: &[(String, DiskAction)],
        want: SnapshotState,
        intent: &mut Intent,
        id: i64,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        match &target.meta.memory {
            MemorySnapshot::None => {
                if want == SnapshotState::Shutoff {
                    return Ok(());
                }
                intent.step = "start QEMU".into();
                self.snaps.step(id, intent)?;
                let options = LaunchOptions {
                    paused: want == SnapshotState::Paused,
                    incoming_defer: false,
                };
                let qmp = self.launch(dom, disk_chains, options).await?;
                qmp.close().await;
                Ok(())
            }
            MemorySnapshot::External { path } => {
                intent.step = "start QEMU for the memory image".into();
                self.snaps.step(id, intent)?;
                let options = LaunchOptions {
                    paused: true,
                    incoming_defer: true,
                };
                let qmp = self.launch(dom, disk_chains, options).await?;
                let uri = format!("exec:cat {}", shell_quote(path));
                qmp.migrate_incoming(&uri)
                    .await
                    .map_err(qmp_error(&dom.name, "migrate-incoming"))?;
                wait_migration_with_progress(&dom.name, &qmp, "loading memory", progress).await?;
                set_run_state(&dom.name, &qmp, want).await?;
                qmp.close().await;
                Ok(())
            }
            MemorySnapshot::Internal { vmstate_disk } => {
                intent.step = "start QEMU for snapshot-load".into();
                self.snaps.step(id, intent)?;
                let options = LaunchOptions {
                    paused: true,
                    incoming_defer: false,
                };
                let qmp = self.launch(dom, disk_chains, options).await?;
                // A clone carries copies of every snapshot of its original;
                // the records keep the originals, so drop the copies (all but
                // the one to load now, and that one after loading it).
                let clones: Vec<(&crate::disk::DiskLayer, &String)> = actions
                    .iter()
                    .filter_map(|(disk, action)| match action {
                        DiskAction::Clone { tag, .. } => disk_chains
                            .iter()
                            .find(|c| &c.target == disk)
                            .and_then(|c| c.active())
                            .map(|layer| (layer, tag)),
                        _ => None,
                    })
                    .collect();
                for (layer, tag) in &clones {
                    live_delete_tags(&dom.name, &qmp, layer, Some(tag.as_str())).await?;
                }
                self.load_internal(dom, &qmp, disk_chains, target, vmstate_disk, want, progress)
                    .await?;
                for (layer, _) in &clones {
                    live_delete_tags(&dom.name, &qmp, layer, None).await?;
                }
                qmp.close().await;
                Ok(())
            }
        }
    }

    /// `snapshot-delete`.
    pub async fn delete(
        &self,
        domain: &str,
        name: &str,
        scope: DeleteScope,
        metadata_only: bool,
        progress: ProgressFn<'_>,
    ) -> Result<DeleteOutcome> {
        let dom = self.lock(domain)?;
        let mut outcome = DeleteOutcome {
            notes: self.recover_locked(&dom).await?,
            ..DeleteOutcome::default()
        };
        let tree = SnapshotTree::new(
            self.snaps
                .snapshots(domain)?
                .into_iter()
                .map(|s| s.meta)
                .collect(),
        )
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        if !tree.contains(name) {
            return Err(SnapshotError::UnknownSnapshot {
                domain: domain.to_string(),
                name: name.to_string(),
            });
        }
        let plan = tree
            .plan_delete(name, scope, metadata_only)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        if metadata_only {
            let before = self.snaps.snapshots(domain)?;
            let current = chains_of(&self.snaps.chains(domain)?);
            let needed_before = needed_files(&current, &before);
            let after: Vec<StoredSnapshot> = before
                .iter()
                .filter(|s| !plan.removed.contains(&s.name))
                .cloned()
                .collect();
            let needed_after = needed_files(&current, &after);
            let released: Vec<PathBuf> = needed_before.difference(&needed_after).cloned().collect();
            self.snaps.disown(domain, &released)?;
            let change =
                self.removal_change(&before, &plan.removed, plan.current_after.clone(), None);
            self.snaps.apply(domain, &change)?;
            outcome.removed = plan.removed;
            return Ok(outcome);
        }
        for victim in &plan.removed {
            self.delete_one(&dom, victim, &mut outcome, progress)
                .await?;
            outcome.removed.push(victim.clone());
        }
        outcome.notes.extend(self.collect_garbage(&dom)?);
        Ok(outcome)
    }

    /// The record change removing `names`: their children move to their
    /// parents; the current pointer goes to `current`.
    fn removal_change(
        &self,
        snapshots: &[StoredSnapshot],
        names: &[String],
        current: Option<String>,
        storage_updates: Option<&BTreeMap<String, SnapshotStorage>>,
    ) -> Change {
        let parent_of = |name: &str| {
            snapshots
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.meta.parent.clone())
        };
        let mut change = Change {
            remove: names.to_vec(),
            current: Some(current),
            ..Change::default()
        };
        for snapshot in snapshots {
            if names.contains(&snapshot.name) {
                continue;
            }
            let mut meta = snapshot.meta.clone();
            let mut changed = false;
            while let Some(parent) = meta.parent.clone().filter(|p| names.contains(p)) {
                meta.parent = parent_of(&parent);
                changed = true;
            }
            let storage = storage_updates.and_then(|u| u.get(&snapshot.name)).cloned();
            if changed || storage.is_some() {
                change
                    .put
                    .push((meta, storage.unwrap_or_else(|| snapshot.storage.clone())));
            }
        }
        change
    }

    async fn delete_one(
        &self,
        dom: &Domain,
        name: &str,
        outcome: &mut DeleteOutcome,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let domain = dom.name.as_str();
        let snapshots = self.snaps.snapshots(domain)?;
        let Some(victim) = snapshots.iter().find(|s| s.name == name).cloned() else {
            return Ok(());
        };
        let remaining: Vec<StoredSnapshot> = snapshots
            .iter()
            .filter(|s| s.name != name)
            .cloned()
            .collect();
        let disk_chains = self.snaps.chains(domain)?;
        let current = chains_of(&disk_chains);
        let owned: BTreeSet<PathBuf> = self.snaps.owned_files(domain)?.into_iter().collect();
        let mut intent = Intent::new(Operation::Delete, name);
        let mut merges: Vec<Merge> = Vec::new();
        for (target, capture) in &victim.storage.disks {
            match capture {
                DiskCapture::Internal { chain, tag } => {
                    intent
                        .doomed_tags
                        .push((chain.top().file.clone(), tag.clone()));
                }
                DiskCapture::External { chain } => {
                    if let Some(merge) = plan_merge(target, chain, &owned, &current, &remaining) {
                        merges.push(merge);
                    }
                }
                DiskCapture::Excluded => {}
            }
        }
        // Layers an earlier delete had to keep may be free to go now too.
        let merges = with_stale_merges(merges, &owned, &current, &remaining);
        let id = self.snaps.begin(domain, &intent)?;
        let qmp = self.running_qmp(dom).await?;
        // Merge each frozen image into its only child; the records still
        // name it until the commit, and its data is in both, so a crash here
        // loses nothing.
        let mut new_disk_chains = disk_chains.clone();
        let mut storage_updates: BTreeMap<String, SnapshotStorage> = BTreeMap::new();
        for merge in &merges {
            intent.step = format!(
                "merge {} into {}",
                merge.frozen.file.display(),
                merge.child.file.display()
            );
            self.snaps.step(id, &intent)?;
            let live_chain = disk_chains.iter().find(|c| {
                c.target == merge.target && c.layers.iter().any(|l| l.path == merge.child.file)
            });
            match (&qmp, live_chain) {
                (Some(qmp), Some(chain)) => {
                    self.stream_live(dom, qmp, chain, merge, progress).await?;
                }
                _ => {
                    progress(Progress {
                        step: &format!("merging {}", merge.target),
                        done: 0,
                        total: 1,
                    });
                    offline::rebase(&merge.child, &merge.frozen, &merge.base)?;
                    progress(Progress {
                        step: &format!("merging {}", merge.target),
                        done: 1,
                        total: 1,
                    });
                }
            }
            for chain in new_disk_chains.iter_mut() {
                chain.layers.retain(|l| l.path != merge.frozen.file);
            }
            for snapshot in &remaining {
                let base = storage_updates
                    .get(&snapshot.name)
                    .cloned()
                    .unwrap_or_else(|| snapshot.storage.clone());
                let mut updated = base.clone();
                for capture in updated.disks.values_mut() {
                    match capture {
                        DiskCapture::Internal { chain, .. } | DiskCapture::External { chain } => {
                            *chain = without_layer(chain, &merge.frozen.file);
                        }
                        DiskCapture::Excluded => {}
                    }
                }
                if updated != base || storage_updates.contains_key(&snapshot.name) {
                    storage_updates.insert(snapshot.name.clone(), updated);
                }
            }
            outcome.merged.push(merge.frozen.file.clone());
        }
        let current_ptr = self.snaps.current(domain)?;
        let new_current = if current_ptr.as_deref() == Some(name) {
            victim.meta.parent.clone()
        } else {
            current_ptr
        };
        let mut change = self.removal_change(
            &snapshots,
            &[name.to_string()],
            new_current,
            Some(&storage_updates),
        );
        // Other snapshots whose chains changed but which did not move.
        for (snap, storage) in &storage_updates {
            if !change.put.iter().any(|(m, _)| &m.name == snap) {
                if let Some(s) = remaining.iter().find(|s| &s.name == snap) {
                    change.put.push((s.meta.clone(), storage.clone()));
                }
            }
        }
        if !merges.is_empty() {
            change.chains = new_disk_chains;
        }
        intent.committed = true;
        intent.step = "delete internal snapshots".into();
        self.snaps
            .commit(domain, id, Operation::Delete, &change, Some(&intent))?;
        let mut left = Vec::new();
        for (image, tag) in &intent.doomed_tags {
            if let Err(err) = self.delete_tag(dom, qmp.as_ref(), image, tag).await {
                outcome.notes.push(format!(
                    "internal snapshot '{tag}' stays in {} for now ({err}); a later command removes it",
                    image.display()
                ));
                left.push((image.clone(), tag.clone()));
            }
        }
        if left.is_empty() {
            self.snaps.close(id)?;
        } else {
            intent.doomed_tags = left;
            self.snaps.step(id, &intent)?;
        }
        if let Some(qmp) = qmp {
            qmp.close().await;
        }
        Ok(())
    }

    /// Undoes a disk switch of a failed external snapshot: each overlay's
    /// writes since the switch are committed back into the image below it
    /// (QEMU active commit), the device goes back to that image, and the
    /// overlay's nodes are released so the file can be removed.
    async fn unswitch(
        &self,
        dom: &Domain,
        qmp: &Qmp,
        switches: &[(String, String, PathBuf)],
        old_chains: &[DiskChain],
    ) -> Result<()> {
        for (top, overlay, _) in switches {
            let job = format!("vmsnap-undo-{overlay}");
            qmp.execute(
                "block-commit",
                Some(json!({"job-id": job, "device": overlay, "base-node": top, "auto-dismiss": false})),
            )
            .await
            .map_err(qmp_error(&dom.name, "block-commit"))?;
            let deadline = Instant::now() + JOB_TIMEOUT;
            loop {
                let jobs = qmp
                    .query_jobs()
                    .await
                    .map_err(qmp_error(&dom.name, "query-jobs"))?;
                match jobs.iter().find(|j| j.id == job) {
                    Some(info) if info.status == vmsnap_qmp::JobStatus::Ready => break,
                    Some(info) if info.status == vmsnap_qmp::JobStatus::Concluded => break,
                    None => break,
                    _ if Instant::now() >= deadline => {
                        return Err(SnapshotError::Conflict(format!(
                            "undoing the switch of {overlay} in domain {} did not finish",
                            dom.name
                        )))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let _ = qmp.execute("job-complete", Some(json!({"id": job}))).await;
            qmp.wait_job(&job, JOB_TIMEOUT)
                .await
                .map_err(qmp_error(&dom.name, "block-commit"))?;
            let _ = qmp
                .execute("blockdev-del", Some(json!({"node-name": overlay})))
                .await;
            let _ = qmp
                .execute(
                    "blockdev-del",
                    Some(json!({"node-name": file_node_name(overlay)})),
                )
                .await;
        }
        self.snaps.apply(
            &dom.name,
            &Change {
                chains: old_chains.to_vec(),
                ..Change::default()
            },
        )
    }

    async fn stream_live(
        &self,
        dom: &Domain,
        qmp: &Qmp,
        chain: &DiskChain,
        merge: &Merge,
        progress: ProgressFn<'_>,
    ) -> Result<()> {
        let node = |file: &Path| {
            chain
                .layers
                .iter()
                .find(|l| l.path == file)
                .map(|l| l.node_name.clone())
                .unwrap_or_default()
        };
        let child = node(&merge.child.file);
        let frozen = node(&merge.frozen.file);
        let base = node(&merge.base.file);
        // A child below the active layer (frozen by a later snapshot) is open
        // read-only, its file node explicitly so, which QEMU's stream cannot
        // change by itself ("Block node is read-only"): it is made writable
        // for the stream and read-only again after, on its new backing.
        let below_active = chain
            .active()
            .is_some_and(|active| active.path != merge.child.file);
        let reopen = |read_only: bool, backing: &str| {
            json!({"options": [
                {"driver": "file", "node-name": file_node_name(&child),
                 "filename": merge.child.file, "read-only": read_only, "discard": "unmap"},
                {"driver": merge.child.format.as_str(), "node-name": child,
                 "file": file_node_name(&child), "backing": backing,
                 "read-only": read_only, "discard": "unmap"},
            ]})
        };
        let job = job_id("stream");
        progress(Progress {
            step: &format!("merging {}", merge.target),
            done: 0,
            total: 1,
        });
        if below_active {
            qmp.execute("blockdev-reopen", Some(reopen(false, &frozen)))
                .await
                .map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
        }
        let streamed = match qmp
            .execute(
                "block-stream",
                Some(json!({"job-id": job, "device": child, "base-node": base, "auto-dismiss": false})),
            )
            .await
        {
            Ok(_) => qmp.wait_job(&job, JOB_TIMEOUT).await,
            Err(err) => Err(err),
        };
        if below_active {
            let backing = if streamed.is_ok() { &base } else { &frozen };
            let restored = qmp
                .execute("blockdev-reopen", Some(reopen(true, backing)))
                .await;
            streamed.map_err(qmp_error(&dom.name, "block-stream"))?;
            restored.map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
        } else {
            streamed.map_err(qmp_error(&dom.name, "block-stream"))?;
        }
        progress(Progress {
            step: &format!("merging {}", merge.target),
            done: 1,
            total: 1,
        });
        // The frozen image's nodes were added by us: release its file.
        let _ = qmp
            .execute("blockdev-del", Some(json!({"node-name": frozen})))
            .await;
        let _ = qmp
            .execute(
                "blockdev-del",
                Some(json!({"node-name": file_node_name(&frozen)})),
            )
            .await;
        Ok(())
    }

    /// `snapshot-create --redefine`: records metadata for a snapshot whose
    /// data already exists (internal tags in the images, or frozen images).
    pub fn redefine(&self, domain: &str, meta: SnapshotMeta, make_current: bool) -> Result<()> {
        let dom = self.lock(domain)?;
        let snapshots = self.snaps.snapshots(domain)?;
        let mut tree = SnapshotTree::new(snapshots.iter().map(|s| s.meta.clone()).collect())
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        tree.insert_redefined(meta.clone(), make_current)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let chains = self.snaps.chains(domain)?;
        let mut storage = SnapshotStorage::default();
        for record in &meta.disks {
            let format = match record.source_format.as_str() {
                "raw" => DiskFormat::Raw,
                _ => DiskFormat::Qcow2,
            };
            let current = chains.iter().find(|c| c.target == record.target);
            // The chain below the recorded image: the current chain's, when
            // the image is part of it; else the image alone.
            let chain = match current.map(chain_of) {
                Some(c) if c.contains(&record.source) => {
                    let pos =
                        c.0.iter()
                            .position(|l| l.file == record.source)
                            .expect("contains");
                    Chain(c.0[..=pos].to_vec())
                }
                _ => Chain(vec![Layer::new(record.source.clone(), format)]),
            };
            let capture = match record.mode {
                DiskSnapshotMode::Internal => DiskCapture::Internal {
                    chain,
                    tag: meta.name.clone(),
                },
                DiskSnapshotMode::External => DiskCapture::External { chain },
                DiskSnapshotMode::No => DiskCapture::Excluded,
            };
            storage.disks.insert(record.target.clone(), capture);
        }
        let change = Change {
            put: vec![(meta.clone(), storage)],
            current: make_current.then(|| Some(meta.name.clone())),
            ..Change::default()
        };
        self.snaps.apply(&dom.name, &change)?;
        Ok(())
    }

    /// `snapshot-current NAME`: makes an existing snapshot current (the
    /// parent of the next one) without touching the guest.
    pub fn set_current(&self, domain: &str, name: &str) -> Result<()> {
        let dom = self.lock(domain)?;
        self.get(domain, name)?;
        self.snaps.apply(
            &dom.name,
            &Change {
                current: Some(Some(name.to_string())),
                ..Change::default()
            },
        )
    }
}

/// Deletes every internal snapshot but `keep` from the image behind a running
/// QEMU's top node, letting the freed clusters become holes in the file.
async fn live_delete_tags(
    domain: &str,
    qmp: &Qmp,
    layer: &crate::disk::DiskLayer,
    keep: Option<&str>,
) -> Result<()> {
    enable_discard(qmp, layer).await;
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(qmp_error(domain, "query-named-block-nodes"))?;
    let tags: Vec<String> = nodes
        .iter()
        .find(|n| n.node_name == layer.node_name)
        .and_then(|n| n.image.as_ref())
        .and_then(|i| i.snapshots.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .filter(|name| Some(name.as_str()) != keep)
        .collect();
    for tag in tags {
        qmp.execute(
            "blockdev-snapshot-delete-internal-sync",
            Some(json!({"device": layer.node_name, "name": tag})),
        )
        .await
        .map_err(qmp_error(domain, "blockdev-snapshot-delete-internal-sync"))?;
    }
    Ok(())
}

/// Lets the clusters QEMU frees in a layer reach its file as holes, so
/// deleted snapshots really give their storage back (QEMU ignores discards
/// unless the protocol node has `discard=unmap`). Best effort.
pub(super) async fn enable_discard(qmp: &Qmp, layer: &crate::disk::DiskLayer) {
    let _ = qmp
        .execute(
            "blockdev-reopen",
            Some(json!({"options": [{
                "driver": "file",
                "node-name": file_node_name(&layer.node_name),
                "filename": layer.path,
                "discard": "unmap",
            }]})),
        )
        .await;
}

async fn set_run_state(domain: &str, qmp: &Qmp, want: SnapshotState) -> Result<()> {
    let status = qmp
        .query_status()
        .await
        .map_err(qmp_error(domain, "query-status"))?;
    match want {
        SnapshotState::Running if !status.running => {
            qmp.cont().await.map_err(qmp_error(domain, "cont"))
        }
        SnapshotState::Paused | SnapshotState::Shutoff | SnapshotState::DiskSnapshot
            if status.running =>
        {
            qmp.stop().await.map_err(qmp_error(domain, "stop"))
        }
        _ => Ok(()),
    }
}

/// The longest STOP→RESUME interval among `events` received so far.
fn pause_from_events(events: &mut vmsnap_qmp::EventReceiver) -> Option<f64> {
    let mut stop: Option<f64> = None;
    let mut longest: Option<f64> = None;
    while let Some(Ok(event)) = events.try_recv() {
        match event.name.as_str() {
            "STOP" => stop = Some(event_ms(&event)),
            "RESUME" => {
                if let Some(start) = stop.take() {
                    let pause = event_ms(&event) - start;
                    longest = Some(longest.map_or(pause, |l: f64| l.max(pause)));
                }
            }
            _ => {}
        }
    }
    longest
}

async fn wait_migration_with_progress(
    domain: &str,
    qmp: &Qmp,
    step: &str,
    progress: ProgressFn<'_>,
) -> Result<vmsnap_qmp::MigrationInfo> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(qmp_error(domain, "query-migrate"))?;
        if let Some(ram) = &info.ram {
            progress(Progress {
                step,
                done: ram.transferred,
                total: ram.total,
            });
        }
        use vmsnap_qmp::MigrationStatus as S;
        match &info.status {
            Some(S::Completed) | Some(S::Failed) | Some(S::Cancelled) => {
                return qmp
                    .wait_migration(Duration::from_secs(5))
                    .await
                    .map_err(qmp_error(domain, "migrate"));
            }
            _ if Instant::now() >= deadline => {
                return qmp
                    .wait_migration(Duration::from_secs(1))
                    .await
                    .map_err(qmp_error(domain, "migrate"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

enum CreatePlan {
    Internal {
        disks: Vec<String>,
        memory: bool,
    },
    External {
        disks: Vec<(String, PathBuf)>,
        /// Disks snapshotted inside their qcow2 image beside the external ones.
        internal: Vec<String>,
        memory_file: Option<PathBuf>,
        /// Overlays that exist already (`--reuse-external`): checked, not created.
        reused: BTreeSet<PathBuf>,
    },
}

/// Why `file` cannot be the existing overlay of disk `target`.
fn reuse_refused(target: &str, file: &Path, why: &str) -> SnapshotError {
    SnapshotError::Invalid(format!(
        "cannot reuse {} as the overlay of disk {target} (--reuse-external): {why}",
        file.display()
    ))
}

/// `--reuse-external`: `file` may become the overlay of `active` only when
/// it is what vmsnap would have made itself: a qcow2 image of the disk's
/// size whose header names `active` (path and format) as its backing file,
/// holding no data and no internal snapshots. Anything else would change
/// what the guest reads, lose the file's contents, or make vmsnap follow a
/// backing file nobody configured.
fn check_reusable_overlay(
    target: &str,
    file: &Path,
    active: &crate::disk::DiskLayer,
    size: u64,
) -> Result<()> {
    let refuse = |why: String| Err(reuse_refused(target, file, &why));
    let image = vmsnap_qcow2::Qcow2Image::open(
        file,
        vmsnap_qcow2::OpenOptions {
            writable: false,
            backing: vmsnap_qcow2::BackingPolicy::Ignore,
        },
    );
    let mut image = match image {
        Ok(image) => image,
        Err(err) => return refuse(format!("it is not a usable qcow2 image ({err})")),
    };
    let expected = format!(
        "create it with `vmsnap img create -f qcow2 -b {} -F {} {}`",
        active.path.display(),
        active.format.as_str(),
        file.display()
    );
    match image.backing_file() {
        Some((name, Some(format))) => {
            let named = Path::new(&name);
            let resolved = if named.is_absolute() {
                named.to_path_buf()
            } else {
                file.parent().unwrap_or(Path::new("/")).join(named)
            };
            if resolved != active.path || format != active.format.as_str() {
                return refuse(format!(
                    "its backing file is {name} ({format}), not the disk's active image {} ({}); {expected}",
                    active.path.display(),
                    active.format.as_str()
                ));
            }
        }
        Some((name, None)) => {
            return refuse(format!(
                "its header names backing file {name} without a format, which vmsnap never guesses; {expected}"
            ))
        }
        None => return refuse(format!("it has no backing file; {expected}")),
    }
    if image.size() != size {
        return refuse(format!(
            "it is {} bytes, the disk is {size}; {expected}",
            image.size()
        ));
    }
    if !image.snapshots().is_empty() {
        return refuse("it holds internal snapshots".into());
    }
    match image.allocation(0, size) {
        Ok((false, run)) if run == size => Ok(()),
        Ok(_) => refuse(
            "it holds data, which would change the guest's disk; use an empty overlay".into(),
        ),
        Err(err) => refuse(format!("it cannot be read ({err})")),
    }
}

/// The record of how disk `target`, whose active image is `active`, is in a
/// snapshot; `overlay` is the new qcow2 layer of an external one.
fn disk_record(
    target: &str,
    active: &crate::disk::DiskLayer,
    mode: DiskSnapshotMode,
    overlay: Option<&Path>,
) -> DiskSnapshotRecord {
    DiskSnapshotRecord {
        target: target.to_string(),
        mode,
        source: active.path.clone(),
        source_format: active.format.as_str().into(),
        overlay: overlay.map(Path::to_path_buf),
        overlay_format: overlay.map(|_| "qcow2".into()),
    }
}

/// Refuses an internal snapshot of a disk whose active image is not qcow2.
fn require_qcow2(dom: &Domain, chain: &DiskChain) -> Result<()> {
    let active = chain.active().expect("recorded chains are never empty");
    if active.format == DiskFormat::Qcow2 {
        return Ok(());
    }
    Err(SnapshotError::InternalNeedsQcow2 {
        domain: dom.name.clone(),
        disk: chain.target.clone(),
        format: active.format.as_str().into(),
        file: active.path.clone(),
    })
}

/// `DIR/STEM.EXT`, or `DIR/STEM.N.EXT` for the first N that is free.
fn unique_file(dir: &Path, stem: &str, ext: &str, taken: &BTreeSet<PathBuf>) -> PathBuf {
    let mut candidate = dir.join(format!("{stem}.{ext}"));
    let mut n = 1;
    while candidate.exists() || taken.contains(&candidate) {
        candidate = dir.join(format!("{stem}.{n}.{ext}"));
        n += 1;
    }
    candidate
}

/// Whether a name is in use, a dangling symlink included: a file vmsnap
/// creates must not appear through a link somewhere the user did not name.
fn path_taken(path: &Path) -> bool {
    !matches!(
        std::fs::symlink_metadata(path),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound
    )
}

/// Writes back the host's cached data of the file system holding `path`
/// (best effort: only a shorter pause depends on it).
fn sync_filesystem(path: &Path) {
    let dir = path.parent().unwrap_or(Path::new("/"));
    if let Ok(handle) = std::fs::File::open(dir) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs only reads the descriptor, valid while `handle` lives.
        unsafe { libc::syncfs(handle.as_raw_fd()) };
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("cannot create directory", dir))
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::ram_blocks;

    /// `info ramblock` of QEMU 7.2 (pc machine, 128 MiB, std VGA, e1000).
    const INFO_RAMBLOCK: &str = "              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
   0000:00:02.0/vga.vram    4 KiB  0x0000000008080000 0x0000000001000000 0x0000000001000000
    /rom@etc/acpi/tables    4 KiB  0x0000000009100000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000
  0000:00:03.0/e1000.rom    4 KiB  0x00000000090c0000 0x0000000000040000 0x0000000000040000
                  pc.rom    4 KiB  0x0000000008040000 0x0000000000020000 0x0000000000020000
    0000:00:02.0/vga.rom    4 KiB  0x0000000009080000 0x0000000000010000 0x0000000000010000
   /rom@etc/table-loader    4 KiB  0x0000000009300000 0x0000000000001000 0x0000000000010000
      /rom@etc/acpi/rsdp    4 KiB  0x0000000009340000 0x0000000000001000 0x0000000000001000
";

    #[test]
    fn every_ram_block_counts_with_its_used_length() {
        let blocks = ram_blocks(INFO_RAMBLOCK);
        assert_eq!(blocks.len(), 9);
        assert_eq!(blocks[0], ("pc.ram".to_string(), 128 << 20));
        assert_eq!(blocks[1], ("0000:00:02.0/vga.vram".to_string(), 16 << 20));
        // Used, not Total: the ACPI tables block may grow to 2 MiB but uses 128 KiB.
        assert_eq!(blocks[2].1, 0x20000);
        let total: u64 = blocks.iter().map(|(_, used)| used).sum();
        assert_eq!(
            total,
            0x8000000 + 0x1000000 + 0x20000 + 0x40000 * 2 + 0x20000 + 0x10000 + 0x2000
        );
    }

    #[test]
    fn an_unexpected_listing_yields_no_blocks() {
        assert!(ram_blocks("").is_empty());
        assert!(ram_blocks("unknown command: 'info ramblock'\n").is_empty());
        assert!(ram_blocks("header\n  pc.ram 4 KiB 0x0 0xnothex 0x0\n").is_empty());
    }
}
