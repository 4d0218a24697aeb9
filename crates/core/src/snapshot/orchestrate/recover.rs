//! Recovery: what the next command does about an operation a killed vmsnap
//! (or a killed QEMU) left half done, and the clean-up every command runs.
//! It rolls back or finishes each open journal entry, repairs images the
//! qcow2 engine was changing, settles QEMU jobs the dead process started,
//! and removes files nothing needs (DESIGN §5.4).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use vmsnap_qcow2::{Qcow2Image, RepairMode};
use vmsnap_qmp::{JobStatus, MigrationStatus, Qmp, RunState};

use super::error::{Result, SnapshotError};
use super::model::{chains_of, DiskCapture};
use super::offline;
use super::ops::{enable_discard, Domain, Orchestrator, Progress, JOB_TIMEOUT};
use super::plan::needed_files;
use super::runtime::qmp_error;
use super::store::{Change, Intent, OpenIntent, Operation};
use crate::config::DiskFormat;
use crate::disk::{file_node_name, DiskChain};
use crate::domain::QemuProcess;

/// Every QMP job id vmsnap gives starts so; recovery settles leftovers by it.
const JOB_PREFIX: &str = "vmsnap-";

/// How long recovery waits for a job a killed vmsnap left running in QEMU
/// before it gives up (and the command fails, to be tried again later).
const LEFTOVER_JOB_WAIT: Duration = Duration::from_secs(120);

/// How long recovery keeps trying to reach a QEMU that is alive but silent.
const BUSY_QEMU_WAIT: Duration = Duration::from_secs(120);

/// Pause between two looks at a busy QEMU.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How long recovery waits for a stray QEMU it killed to be gone.
const STRAY_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Attempts at finishing an interrupted revert.
const REDO_ATTEMPTS: u32 = 3;

/// Pause between two attempts at finishing an interrupted revert.
const REDO_PAUSE: Duration = Duration::from_secs(1);

/// Passes of recovery before a monitor that keeps breaking is reported.
const RECOVERY_ATTEMPTS: u32 = 3;

impl Orchestrator<'_> {
    /// Finishes or rolls back what a killed vmsnap left on `domain` and
    /// removes files nothing needs; returns what it did, one line each.
    pub async fn recover(&self, domain: &str) -> Result<Vec<String>> {
        // Recovery changes images only to record it; on a full state disk it cannot.
        self.store().ensure_writable()?;
        let dom = self.lock(domain)?;
        self.recover_locked(&dom).await
    }

    /// [`Self::recover`] when the journal holds an operation a killed vmsnap
    /// left open, and nothing otherwise: what every command that acts on a
    /// domain (start, destroy, ...) does first, so no one runs a VM on a
    /// half-finished revert that a later command would then redo.
    pub async fn recover_if_interrupted(&self, domain: &str) -> Result<Vec<String>> {
        if self.snaps.open_intents(domain)?.is_empty() {
            return Ok(Vec::new());
        }
        self.recover(domain).await
    }

    /// [`Self::recover`] for a domain whose lock is held. A monitor
    /// connection that breaks half way (QEMU exiting, or busy past the
    /// timeout) makes it start over: every step can run twice.
    pub(super) async fn recover_locked(&self, dom: &Domain) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let mut attempt = 1;
        loop {
            match self.recover_pass(dom, &mut notes).await {
                Err(err) if attempt < RECOVERY_ATTEMPTS && lost_monitor(&err) => attempt += 1,
                Err(err) => return Err(err),
                Ok(()) => return Ok(notes),
            }
        }
    }

    /// One pass of recovery: settle QEMU's leftover jobs, then roll back or
    /// finish each open intent, repair what the engine was changing, and
    /// clean up.
    async fn recover_pass(&self, dom: &Domain, notes: &mut Vec<String>) -> Result<()> {
        let intents = self.snaps.open_intents(&dom.name)?;
        notes.extend(end_stray_qemus(&dom.paths.pid_file).await);
        let qmp = self.connect_if_running(dom, BUSY_QEMU_WAIT).await?;
        if let Some(qmp) = &qmp {
            self.settle_jobs(dom, qmp, notes).await?;
            let creates: Vec<&Intent> = intents
                .iter()
                .map(|open| &open.intent)
                .filter(|intent| intent.op == Operation::Create && !intent.committed)
                .collect();
            if !creates.is_empty() {
                cancel_memory_save(&dom.name, qmp, notes).await?;
                let resumes = creates.iter().any(|intent| intent.paused_guest);
                reactivate_after_save(&dom.name, qmp, resumes).await?;
            }
            if !intents.is_empty() {
                self.adopt_live_chains(dom, qmp, notes).await?;
            }
        }
        // Reverts past their first step are finished, not rolled back: the
        // old QEMU may be gone already, and with it the state to go back to.
        let mut reverts: Vec<OpenIntent> = Vec::new();
        for open in intents {
            let intent = &open.intent;
            if intent.op == Operation::Revert && !intent.committed && intent.step != "begin" {
                reverts.push(open);
                continue;
            }
            let mut remaining = Vec::new();
            let tags = if intent.committed {
                &intent.doomed_tags
            } else {
                &intent.new_tags
            };
            for (image, tag) in tags {
                if let Err(err) = self.delete_tag(dom, qmp.as_ref(), image, tag).await {
                    if lost_monitor(&err) {
                        return Err(err);
                    }
                    remaining.push((image.clone(), tag.clone(), err.to_string()));
                }
            }
            if intent.paused_guest {
                if let Some(qmp) = &qmp {
                    let status = qmp
                        .query_status()
                        .await
                        .map_err(qmp_error(&dom.name, "query-status"))?;
                    if !status.running {
                        qmp.cont().await.map_err(qmp_error(&dom.name, "cont"))?;
                        notes.push(format!(
                            "resumed the guest paused by an interrupted {}",
                            intent.op.as_str()
                        ));
                    }
                }
            }
            let what = format!(
                "the interrupted {} of snapshot '{}'",
                intent.op.as_str(),
                intent.snapshot
            );
            let mut repaired = Vec::new();
            if qmp.is_none() {
                for image in self.touched_images(&dom.name, intent)? {
                    repaired.extend(repair_image(&image, &what));
                }
            }
            if remaining.is_empty() {
                self.snaps.close(open.id)?;
                notes.push(format!(
                    "{} {what}",
                    if intent.committed {
                        "finished"
                    } else {
                        "rolled back"
                    },
                ));
            } else {
                let mut left = intent.clone();
                left.committed = true;
                left.doomed_tags = remaining
                    .iter()
                    .map(|(i, t, _)| (i.clone(), t.clone()))
                    .collect();
                left.new_tags.clear();
                left.paused_guest = false;
                self.snaps.step(open.id, &left)?;
                for (image, tag, err) in &remaining {
                    notes.push(format!(
                        "internal snapshot '{tag}' of {what} stays in {} for now ({err}); a later command removes it",
                        image.display()
                    ));
                }
            }
            notes.append(&mut repaired);
        }
        if let Some(qmp) = qmp {
            self.release_unneeded_nodes(dom, &qmp).await?;
            qmp.close().await;
        }
        if !reverts.is_empty() {
            self.finish_reverts(dom, &reverts, notes).await?;
        }
        notes.extend(self.collect_garbage(dom)?);
        Ok(())
    }

    /// Finishes interrupted reverts by reverting again (to the last one's
    /// target, in the state the snapshot recorded), then closes their
    /// journal entries. Only then may the dead attempt's files go: until
    /// the new revert has committed, they may be all the domain runs on.
    async fn finish_reverts(
        &self,
        dom: &Domain,
        reverts: &[OpenIntent],
        notes: &mut Vec<String>,
    ) -> Result<()> {
        let Some(last) = reverts.last() else {
            return Ok(());
        };
        let name = &last.intent.snapshot;
        let mode = last.intent.revert_mode;
        let what = format!("the interrupted revert to snapshot '{name}'");
        if self.qemu_is_down(dom)? {
            for open in reverts {
                for image in self.touched_images(&dom.name, &open.intent)? {
                    notes.extend(repair_image(&image, &what));
                }
            }
        }
        let exists = self
            .snaps
            .snapshots(&dom.name)?
            .iter()
            .any(|s| &s.name == name);
        let known: BTreeSet<i64> = self
            .snaps
            .open_intents(&dom.name)?
            .iter()
            .map(|open| open.id)
            .collect();
        let mut result = Ok(());
        if exists {
            // A QEMU the dead process had told to end may still be on its
            // way out: each attempt starts again from what is really there.
            for attempt in 1..=REDO_ATTEMPTS {
                let quiet = |_: Progress<'_>| {};
                match self
                    .revert_locked(dom, name, mode, &quiet, Vec::new())
                    .await
                {
                    Ok(outcome) => {
                        notes.extend(outcome.notes);
                        notes.push(format!("finished {what} (the domain is {})", outcome.state));
                        break;
                    }
                    Err(_) if attempt < REDO_ATTEMPTS => tokio::time::sleep(REDO_PAUSE).await,
                    Err(err) if lost_monitor(&err) => result = Err(err),
                    Err(err) => notes.push(format!(
                        "could not finish {what}: {err}; revert again with `vmsnap snapshot-revert {} {name}`",
                        dom.name
                    )),
                }
            }
        }
        // Journal entries of failed attempts are closed too: a revert that
        // happened much later, on whatever the guest did meanwhile, would
        // lose that work.
        for open in self.snaps.open_intents(&dom.name)? {
            let attempt = !known.contains(&open.id)
                && open.intent.op == Operation::Revert
                && !open.intent.committed;
            if attempt {
                self.snaps.close(open.id)?;
            }
        }
        if result.is_ok() {
            for open in reverts {
                self.snaps.close(open.id)?;
            }
        }
        result
    }

    /// Whether the domain's QEMU is not running (so the engine may open its images).
    fn qemu_is_down(&self, dom: &Domain) -> Result<bool> {
        Ok(!matches!(
            dom.vm.reconcile(self.store(), &dom.lock)?,
            QemuProcess::Alive(_)
        ))
    }

    /// A monitor connection when the domain's QEMU runs, `None` when it
    /// does not (or exits while we wait). A connection QEMU closes before
    /// its greeting (it drops clients that arrive while the one before is
    /// being torn down, e.g. a killed vmsnap's) or a silent QEMU is tried
    /// again for up to `patience`: QEMU answers a new client only once its
    /// main loop is free, and a snapshot-save or -load a killed vmsnap
    /// started keeps it busy for as long as the job takes.
    pub(super) async fn connect_if_running(
        &self,
        dom: &Domain,
        patience: Duration,
    ) -> Result<Option<Qmp>> {
        let deadline = Instant::now() + patience;
        loop {
            match dom.vm.reconcile(self.store(), &dom.lock)? {
                QemuProcess::Alive(_) => {}
                QemuProcess::NotRunning | QemuProcess::Gone(_) => return Ok(None),
            }
            match dom.vm.connect_qmp(&dom.lock).await {
                Ok(qmp) => return Ok(Some(qmp)),
                Err(err) => {
                    let err = SnapshotError::from(err);
                    if !lost_monitor(&err) || Instant::now() >= deadline {
                        return Err(err);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Lets the QEMU jobs a killed vmsnap started (ids `vmsnap-*`) end and
    /// dismisses them, so their ids are free again and the intents are
    /// judged on what the jobs really did.
    /// A job that needs a last push (a ready active commit, a pending job)
    /// gets it, since the dead process was about to give it.
    async fn settle_jobs(&self, dom: &Domain, qmp: &Qmp, notes: &mut Vec<String>) -> Result<()> {
        let deadline = Instant::now() + LEFTOVER_JOB_WAIT;
        let mut pushed = BTreeSet::new();
        loop {
            let jobs = qmp
                .query_jobs()
                .await
                .map_err(qmp_error(&dom.name, "query-jobs"))?;
            let mut busy = Vec::new();
            for job in jobs.into_iter().filter(|j| j.id.starts_with(JOB_PREFIX)) {
                match job.status {
                    JobStatus::Concluded => {
                        qmp.job_dismiss(&job.id)
                            .await
                            .map_err(qmp_error(&dom.name, "job-dismiss"))?;
                        notes.push(match &job.error {
                            None => format!(
                                "QEMU's {} job {} left by an interrupted command had completed; dismissed it",
                                job.job_type.as_str(),
                                job.id
                            ),
                            Some(error) => format!(
                                "QEMU's {} job {} left by an interrupted command had failed ({error}); dismissed it",
                                job.job_type.as_str(),
                                job.id
                            ),
                        });
                    }
                    JobStatus::Null => {}
                    JobStatus::Ready | JobStatus::Pending if !pushed.contains(&job.id) => {
                        let command = if job.status == JobStatus::Ready {
                            "job-complete"
                        } else {
                            "job-finalize"
                        };
                        qmp.execute(command, Some(json!({"id": job.id})))
                            .await
                            .map_err(qmp_error(&dom.name, command))?;
                        pushed.insert(job.id.clone());
                        busy.push(job);
                    }
                    _ => busy.push(job),
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let list: Vec<String> = busy
                    .iter()
                    .map(|j| {
                        format!(
                            "{} job {} ({})",
                            j.job_type.as_str(),
                            j.id,
                            j.status.as_str()
                        )
                    })
                    .collect();
                return Err(SnapshotError::Conflict(format!(
                    "QEMU of domain {} still runs {} that an interrupted vmsnap started, after {}s; \
                     try again once it has ended (see `query-jobs`)",
                    dom.name,
                    list.join(", "),
                    LEFTOVER_JOB_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The qcow2 images an intent's steps may have been changing through
    /// the engine: the images of its tags, and for a revert the images that
    /// hold the target snapshot.
    fn touched_images(&self, domain: &str, intent: &Intent) -> Result<Vec<PathBuf>> {
        let mut images: BTreeSet<PathBuf> = intent
            .new_tags
            .iter()
            .chain(&intent.doomed_tags)
            .map(|(image, _)| image.clone())
            .collect();
        if intent.op == Operation::Revert {
            if let Some(target) = self
                .snaps
                .snapshots(domain)?
                .into_iter()
                .find(|s| s.name == intent.snapshot)
            {
                for capture in target.storage.disks.values() {
                    if let DiskCapture::Internal { chain, .. } = capture {
                        images.insert(chain.top().file.clone());
                    }
                }
            }
        }
        Ok(images.into_iter().filter(|p| p.exists()).collect())
    }

    /// Removes from a running QEMU the block nodes an interrupted operation
    /// added for files nothing needs (so the files can go, and a retry can
    /// add its nodes again).
    pub(super) async fn release_unneeded_nodes(&self, dom: &Domain, qmp: &Qmp) -> Result<()> {
        let current = chains_of(&self.snaps.chains(&dom.name)?);
        let snapshots = self.snaps.snapshots(&dom.name)?;
        let needed = needed_files(&current, &snapshots);
        let owned: BTreeSet<PathBuf> = self.snaps.owned_files(&dom.name)?.into_iter().collect();
        let nodes = qmp
            .query_named_block_nodes()
            .await
            .map_err(qmp_error(&dom.name, "query-named-block-nodes"))?;
        let in_use: BTreeSet<String> = self
            .snaps
            .chains(&dom.name)?
            .iter()
            .flat_map(|c| c.layers.iter().map(|l| l.node_name.clone()))
            .collect();
        let stale: Vec<&vmsnap_qmp::BlockDeviceInfo> = nodes
            .iter()
            .filter(|n| {
                let file = PathBuf::from(&n.file);
                owned.contains(&file) && !needed.contains(&file) && !in_use.contains(&n.node_name)
            })
            .collect();
        // Format nodes before the protocol nodes they sit on.
        for node in stale
            .iter()
            .filter(|n| n.drv != "file")
            .chain(stale.iter().filter(|n| n.drv == "file"))
        {
            let _ = qmp
                .execute("blockdev-del", Some(json!({"node-name": node.node_name})))
                .await;
        }
        Ok(())
    }

    /// Records the chains QEMU really runs on where they differ from the records.
    pub(super) async fn adopt_live_chains(
        &self,
        dom: &Domain,
        qmp: &Qmp,
        notes: &mut Vec<String>,
    ) -> Result<()> {
        let recorded = self.snaps.chains(&dom.name)?;
        let live = super::runtime::live_chains(&dom.name, qmp).await?;
        let mut change = Change::default();
        for disk in &recorded {
            let Some((_, layers)) = live.iter().find(|(t, _)| t == &disk.target) else {
                continue;
            };
            let paths: Vec<&PathBuf> = layers.iter().map(|(_, p)| p).collect();
            let recorded_paths: Vec<&PathBuf> = disk.layers.iter().map(|l| &l.path).collect();
            if paths == recorded_paths {
                continue;
            }
            let layers = layers
                .iter()
                .map(|(node, path)| {
                    let known = disk.layers.iter().find(|l| &l.path == path);
                    crate::disk::DiskLayer {
                        path: path.clone(),
                        format: known.map(|l| l.format).unwrap_or(DiskFormat::Qcow2),
                        node_name: node.clone(),
                    }
                })
                .collect();
            change.chains.push(DiskChain {
                target: disk.target.clone(),
                layers,
            });
            notes.push(format!(
                "disk {} runs on the images QEMU has open; recorded them",
                disk.target
            ));
        }
        if !change.chains.is_empty() {
            self.snaps.apply(&dom.name, &change)?;
        }
        Ok(())
    }

    /// Removes files vmsnap made that neither the current state nor any
    /// snapshot needs; only once no operation is half done.
    pub(super) fn collect_garbage(&self, dom: &Domain) -> Result<Vec<String>> {
        let intents = self.snaps.open_intents(&dom.name)?;
        if intents.iter().any(|open| !open.intent.committed) {
            return Ok(Vec::new());
        }
        let current = chains_of(&self.snaps.chains(&dom.name)?);
        let snapshots = self.snaps.snapshots(&dom.name)?;
        let mut needed = needed_files(&current, &snapshots);
        needed.extend(dom.config.disks.iter().map(|d| d.file.clone()));
        let mut removed = Vec::new();
        let mut notes = Vec::new();
        for file in self.snaps.owned_files(&dom.name)? {
            if needed.contains(&file) {
                continue;
            }
            match std::fs::remove_file(&file) {
                Ok(()) => removed.push(file),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => removed.push(file),
                Err(err) => notes.push(format!("cannot remove unused {}: {err}", file.display())),
            }
        }
        self.snaps.disown(&dom.name, &removed)?;
        Ok(notes)
    }

    pub(super) async fn delete_tag(
        &self,
        dom: &Domain,
        qmp: Option<&Qmp>,
        image: &Path,
        tag: &str,
    ) -> Result<()> {
        if !image.exists() {
            return Ok(());
        }
        if let Some(qmp) = qmp {
            let chains = self.snaps.chains(&dom.name)?;
            if let Some(layer) = chains
                .iter()
                .filter_map(|c| c.active())
                .find(|l| l.path == image)
            {
                let present = offline::live_has_tag(&dom.name, qmp, &layer.node_name, tag).await?;
                if present {
                    enable_discard(qmp, layer).await;
                    qmp.execute(
                        "blockdev-snapshot-delete-internal-sync",
                        Some(json!({"device": layer.node_name, "name": tag})),
                    )
                    .await
                    .map_err(qmp_error(
                        &dom.name,
                        "blockdev-snapshot-delete-internal-sync",
                    ))?;
                }
                return Ok(());
            }
            // A backing layer QEMU has open read-only: make it writable for
            // the moment of the delete (QEMU's lock keeps the engine out).
            for chain in &chains {
                let Some(depth) = chain.layers.iter().position(|l| l.path == image) else {
                    continue;
                };
                let layer = &chain.layers[depth];
                let backing = chain.layers.get(depth + 1).map(|l| l.node_name.clone());
                let reopen = |read_only: bool| {
                    json!({"options": [
                        {"driver": "file", "node-name": file_node_name(&layer.node_name),
                         "filename": layer.path, "read-only": read_only, "discard": "unmap"},
                        {"driver": layer.format.as_str(), "node-name": layer.node_name,
                         "file": file_node_name(&layer.node_name), "backing": backing,
                         "read-only": read_only},
                    ]})
                };
                if !offline::live_has_tag(&dom.name, qmp, &layer.node_name, tag).await? {
                    // A vmsnap killed between its two reopens left the layer
                    // writable (QEMU then holds its write lock): undo that.
                    let nodes = qmp
                        .query_named_block_nodes()
                        .await
                        .map_err(qmp_error(&dom.name, "query-named-block-nodes"))?;
                    if nodes
                        .iter()
                        .any(|n| n.node_name == layer.node_name && !n.ro)
                    {
                        qmp.execute("blockdev-reopen", Some(reopen(true)))
                            .await
                            .map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
                    }
                    return Ok(());
                }
                qmp.execute("blockdev-reopen", Some(reopen(false)))
                    .await
                    .map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
                let job = job_id("delete");
                let deleted = match qmp
                    .execute(
                        "snapshot-delete",
                        Some(json!({"job-id": job, "tag": tag, "devices": [layer.node_name]})),
                    )
                    .await
                {
                    Ok(_) => qmp.wait_job(&job, JOB_TIMEOUT).await,
                    Err(err) => Err(err),
                };
                let restored = qmp.execute("blockdev-reopen", Some(reopen(true))).await;
                deleted.map_err(qmp_error(&dom.name, "snapshot-delete"))?;
                restored.map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
                return Ok(());
            }
        }
        offline::delete_tag_if_present(image, tag)
    }
}

/// A QMP job id for one attempt (`vmsnap-KIND-PID-NANOS-SEQ`). QEMU refuses
/// an id that a concluded job still holds, and a killed vmsnap never
/// dismisses its jobs, so ids must never repeat, not even within a second.
pub(super) fn job_id(kind: &str) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{JOB_PREFIX}{kind}-{}-{nanos}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Ends a memory save (outgoing migration) an interrupted create left
/// running in QEMU and waits until it has stopped: its snapshot is being
/// rolled back, and a save that ended later would stop the guest after
/// recovery has looked. A plain save is cancelled (QEMU resumes a guest the
/// save had stopped); a background-snapshot save is left to finish, because
/// QEMU 7.2 never lifts its write protection from guest RAM after a
/// cancelled one and the guest freezes for good (its file has room: the
/// create reserved it before starting).
async fn cancel_memory_save(domain: &str, qmp: &Qmp, notes: &mut Vec<String>) -> Result<()> {
    let status = qmp
        .query_status()
        .await
        .map_err(qmp_error(domain, "query-status"))?;
    if status.status == RunState::InMigrate {
        return Ok(());
    }
    let capabilities = qmp
        .execute("query-migrate-capabilities", None)
        .await
        .map_err(qmp_error(domain, "query-migrate-capabilities"))?;
    let background = capabilities.as_array().is_some_and(|caps| {
        caps.iter().any(|c| {
            c["capability"] == "background-snapshot" && c["state"] == serde_json::Value::Bool(true)
        })
    });
    let deadline = Instant::now() + LEFTOVER_JOB_WAIT;
    let mut cancelled = false;
    loop {
        let info = qmp
            .query_migrate()
            .await
            .map_err(qmp_error(domain, "query-migrate"))?;
        let running = info
            .status
            .as_ref()
            .is_some_and(|s| *s != MigrationStatus::None && !s.is_terminal());
        if !running {
            if cancelled {
                notes.push(
                    "cancelled the memory save an interrupted create left running in QEMU".into(),
                );
            } else if background {
                notes.push(
                    "waited for the memory save an interrupted create left running in QEMU".into(),
                );
            }
            return Ok(());
        }
        if !cancelled && !background {
            qmp.migrate_cancel()
                .await
                .map_err(qmp_error(domain, "migrate_cancel"))?;
            cancelled = true;
        } else if Instant::now() >= deadline {
            return Err(SnapshotError::Conflict(format!(
                "QEMU of domain {domain} still saves memory for an interrupted snapshot after \
                 {}s; try again later",
                LEFTOVER_JOB_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// A memory save that completed leaves the guest in `postmigrate` with its
/// images inactive, and only `cont` re-activates them in QEMU 7.2: a guest
/// that was paused before is run and stopped at once (one the interrupted
/// create paused, `resumes`, is resumed by its intent's clean-up).
async fn reactivate_after_save(domain: &str, qmp: &Qmp, resumes: bool) -> Result<()> {
    let status = qmp
        .query_status()
        .await
        .map_err(qmp_error(domain, "query-status"))?;
    if status.status == RunState::PostMigrate && !resumes {
        qmp.cont().await.map_err(qmp_error(domain, "cont"))?;
        qmp.stop().await.map_err(qmp_error(domain, "stop"))?;
    }
    Ok(())
}

/// Ends QEMU processes started for this domain (their `-pidfile` is its pid
/// file) that the pid file does not name. A vmsnap killed while QEMU was
/// starting leaves one whose pid file the next command read half written
/// and cleared away: unrecorded, it would hold image locks and the guest's
/// sockets, and run on next to the QEMU a revert starts. Returns notes.
async fn end_stray_qemus(pid_file: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let recorded: Option<u32> = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse().ok());
    let wanted = pid_file.as_os_str().as_bytes();
    let mut strays = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if Some(pid) == recorded || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args
            .windows(2)
            .any(|pair| pair[0] == b"-pidfile" && pair[1] == wanted)
        {
            strays.push(pid);
        }
    }
    let mut notes = Vec::new();
    for pid in strays {
        let Ok(target) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: sending a signal has no memory-safety preconditions; the
        // pid is a positive process id read from /proc, never 0 or -1.
        unsafe {
            libc::kill(target, libc::SIGKILL);
        }
        let cmdline = PathBuf::from(format!("/proc/{pid}/cmdline"));
        let deadline = Instant::now() + STRAY_EXIT_WAIT;
        // A dead process's cmdline reads empty (zombie) or is gone.
        while std::fs::read(&cmdline).is_ok_and(|c| !c.is_empty()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        notes.push(format!(
            "ended QEMU process {pid}, which an interrupted command had started but not recorded"
        ));
    }
    notes
}

/// Whether an error means the monitor connection broke or QEMU did not
/// answer (QEMU exiting or busy), rather than QEMU refusing something.
fn lost_monitor(err: &SnapshotError) -> bool {
    use vmsnap_qmp::ErrorKind as Kind;
    let source: &(dyn std::error::Error + 'static) = match err {
        SnapshotError::Qemu { source, .. } => source.as_ref(),
        SnapshotError::Core(err) => err,
        _ => return false,
    };
    let mut cause = Some(source);
    while let Some(err) = cause {
        if let Some(qmp) = err.downcast_ref::<vmsnap_qmp::Error>() {
            return matches!(
                qmp.kind(),
                Kind::Disconnected | Kind::Timeout | Kind::Connect | Kind::Io | Kind::Protocol
            );
        }
        cause = err.source();
    }
    false
}

/// Runs the engine's full repair (`qemu-img check -r all`: leaked clusters,
/// refcounts, COPIED flags) on an image an interrupted engine operation was
/// changing: the engine raises refcounts before it clears COPIED flags (and
/// lowers them before setting them), so a kill in between leaves counts
/// that qemu-img calls corruption although no data is at risk. Returns the
/// notes for the user; nothing when the image was clean.
fn repair_image(image: &Path, what: &str) -> Vec<String> {
    let shown = image.display();
    let report = Qcow2Image::open_for_check(image, true).and_then(|mut img| {
        let report = img.check(Some(RepairMode::All))?;
        img.flush()?;
        Ok(report)
    });
    let report = match report {
        Ok(report) => report,
        Err(err) => {
            return vec![format!(
                "cannot check {shown} after {what} ({err}); run `vmsnap img check -r all {shown}` while the domain is stopped"
            )]
        }
    };
    let mut notes = Vec::new();
    let mut fixed = Vec::new();
    if report.leaks_fixed > 0 {
        fixed.push(format!("{} leaked cluster(s)", report.leaks_fixed));
    }
    if report.corruptions_fixed > 0 {
        fixed.push(format!(
            "{} refcount or COPIED flag error(s)",
            report.corruptions_fixed
        ));
    }
    if !fixed.is_empty() {
        notes.push(format!(
            "repaired refcounts of {shown} after {what} ({})",
            fixed.join(", ")
        ));
    }
    if report.corruptions + report.check_errors > 0 {
        notes.push(format!(
            "{shown} still has {} error(s) after repair: {}; keep a copy and run `qemu-img check -r all {shown}`",
            report.corruptions + report.check_errors,
            report.messages.first().map_or("", String::as_str)
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_never_repeat_and_carry_the_prefix_recovery_looks_for() {
        let ids: BTreeSet<String> = (0..1000).map(|_| job_id("load")).collect();
        assert_eq!(ids.len(), 1000);
        let pid = std::process::id().to_string();
        for id in &ids {
            assert!(id.starts_with("vmsnap-load-"), "{id}");
            assert_eq!(id.split('-').nth(2), Some(pid.as_str()), "{id}");
            // QEMU accepts only letters, digits, '-', '.' and '_' in ids.
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)),
                "{id}"
            );
        }
    }

    #[test]
    fn only_a_broken_or_silent_monitor_makes_recovery_start_over() {
        let path = PathBuf::from("/run/qmp.sock");
        let qemu = |source: vmsnap_qmp::Error| SnapshotError::Qemu {
            domain: "vm".into(),
            command: "query-jobs".into(),
            source: Box::new(source),
        };
        assert!(lost_monitor(&qemu(vmsnap_qmp::Error::Disconnected {
            path: path.clone()
        })));
        assert!(lost_monitor(&qemu(vmsnap_qmp::Error::Timeout {
            path: path.clone(),
            command: "query-jobs".into(),
            timeout: Duration::from_secs(1),
        })));
        let connect = crate::Error::Qmp {
            name: "vm".into(),
            source: vmsnap_qmp::Error::Connect {
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
            },
        };
        assert!(lost_monitor(&SnapshotError::Core(connect)));
        assert!(!lost_monitor(&qemu(vmsnap_qmp::Error::Qmp {
            path,
            command: "job-dismiss".into(),
            class: "GenericError".into(),
            desc: "Job not found".into(),
        })));
        assert!(!lost_monitor(&SnapshotError::Conflict("busy".into())));
    }
}
