//! `vmsnap check DOM`: what `qemu-img check` is for one image, for a whole
//! domain. After finishing or rolling back an interrupted operation it checks
//! every image the current state or a snapshot needs (through the qcow2
//! engine), looks for files vmsnap made that nothing needs any more, for
//! records pointing at files or internal snapshots that are gone, and for
//! internal snapshots no record knows. Repair fixes what can be fixed without
//! guessing: refcount leaks (and, when asked, refcount errors) of images no
//! QEMU has open, and orphaned files vmsnap made. It never deletes metadata,
//! internal snapshots or files vmsnap did not create: those are reported
//! with the command that removes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use vmsnap_qcow2::{Qcow2Image, RepairMode};

use super::error::Result;
use super::model::{chains_of, DiskCapture};
use super::ops::{Domain, Orchestrator};
use super::plan::needed_files;
use super::runtime::qmp_error;
use super::store::StoredSnapshot;
use crate::config::DiskFormat;
use crate::snapshot::meta::MemorySnapshot;

/// What `check` may change, mirroring `qemu-img check -r leaks|all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckRepair {
    /// Leaked clusters of images and orphaned files vmsnap records as its
    /// own: nothing any snapshot or the current state reads.
    Leaks,
    /// Also refcount errors, refcount structures and COPIED flags of images
    /// (what the engine's `RepairMode::All` fixes), and files in the domain's
    /// snapshot area that nothing needs but vmsnap no longer records as its
    /// own (`snapshot-delete --metadata` leaves a snapshot's files there).
    All,
}

impl CheckRepair {
    fn engine_mode(self) -> RepairMode {
        match self {
            CheckRepair::Leaks => RepairMode::Leaks,
            CheckRepair::All => RepairMode::All,
        }
    }
}

/// How bad a finding is; decides `check`'s exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing, harmless (an internal snapshot made outside vmsnap).
    Notice,
    /// Wasted space only: leaked clusters, files nothing needs.
    Leak,
    /// The check could not look at something (an image it cannot read).
    Error,
    /// Data is damaged or missing: an image is corrupt, or a snapshot or the
    /// current state needs a file or internal snapshot that is gone.
    Corruption,
}

/// Which rule a finding comes from, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// An interrupted operation is still open after recovery.
    UnfinishedOperation,
    /// A qcow2 image has inconsistencies that can lose data.
    ImageCorrupt,
    /// A qcow2 image has clusters with a refcount above their references.
    ImageLeaks,
    /// An image could not be opened or checked.
    ImageUnreadable,
    /// An image QEMU has open has problems that only a stopped domain can repair.
    RepairNeedsStop,
    /// An image of the current state is gone: the domain cannot start.
    MissingDiskImage,
    /// An image a snapshot needs is gone: the snapshot cannot be reverted.
    MissingSnapshotImage,
    /// A snapshot's memory image is gone: the snapshot cannot be reverted.
    MissingMemoryImage,
    /// A recorded internal snapshot is absent from its image.
    MissingInternalSnapshot,
    /// An internal snapshot recorded with memory holds no VM state.
    MissingInternalMemory,
    /// An image holds an internal snapshot no vmsnap snapshot records.
    UnrecordedInternalSnapshot,
    /// A file vmsnap made and still records as its own (overlay, clone,
    /// memory image) that nothing needs.
    OrphanFile,
    /// A file in vmsnap's snapshot area that nothing needs and vmsnap no
    /// longer records as its own (released by `snapshot-delete --metadata`,
    /// or its record lost).
    UnrecordedFile,
    /// An entry in the snapshot area that is not a regular file; left alone.
    ForeignEntry,
    /// vmsnap's record of a file it made that no longer exists.
    StaleFileRecord,
}

/// One problem (or notice) `check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// Which rule found it.
    pub kind: FindingKind,
    /// The file concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The snapshot concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// What is wrong and what to do, in one sentence.
    pub message: String,
    /// Whether this run repaired it.
    pub repaired: bool,
}

/// The engine's verdict on one image (qcow2) or its existence (raw).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageReport {
    /// The image file.
    pub path: PathBuf,
    /// Its recorded format.
    pub format: DiskFormat,
    /// Who needs it: "current vda", "snapshot 's1' vda", ...
    pub used_by: Vec<String>,
    /// Whether the file exists.
    pub exists: bool,
    /// Whether QEMU had it open, so it was checked read-only without locks
    /// (`qemu-img check -U`): the result may be stale and nothing was repaired.
    pub live: bool,
    /// Internal errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Inconsistencies that can lose data, after any repair.
    pub corruptions: u64,
    /// Leaked clusters, after any repair.
    pub leaks: u64,
    /// Corruptions this run repaired.
    pub corruptions_fixed: u64,
    /// Leaks this run repaired.
    pub leaks_fixed: u64,
    /// The internal snapshots the image holds.
    pub internal_snapshots: Vec<InternalSnapshot>,
    /// The engine's messages, in qemu-img's words.
    pub messages: Vec<String>,
}

/// One internal snapshot found in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InternalSnapshot {
    /// Its name (vmsnap names them after the snapshot).
    pub name: String,
    /// Bytes of VM state it holds (0 for disk-only).
    pub vm_state_size: u64,
}

/// Everything one `check` run found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The domain checked.
    pub domain: String,
    /// Whether its QEMU was running.
    pub running: bool,
    /// The repair asked for, if any.
    pub repair: Option<CheckRepair>,
    /// What recovery of an interrupted operation did first, one line each.
    pub recovery: Vec<String>,
    /// Every image checked, in path order.
    pub images: Vec<ImageReport>,
    /// Every problem and notice, worst first.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// `check`'s exit status, like qemu-img's: 0 nothing left to fix (notices
    /// allowed), 2 corruption or missing data, 1 the check could not look at
    /// everything, 3 only leaked clusters or orphaned files (`--repair` fixes
    /// them). Repaired findings do not count.
    pub fn exit_code(&self) -> u8 {
        match self.worst_unrepaired() {
            Some(Severity::Corruption) => 2,
            Some(Severity::Error) => 1,
            Some(Severity::Leak) => 3,
            Some(Severity::Notice) | None => 0,
        }
    }

    /// The worst severity of what is still wrong.
    pub fn worst_unrepaired(&self) -> Option<Severity> {
        self.findings
            .iter()
            .filter(|f| !f.repaired)
            .map(|f| f.severity)
            .max()
    }

    fn push(
        &mut self,
        severity: Severity,
        kind: FindingKind,
        path: Option<&Path>,
        snapshot: Option<&str>,
        message: String,
    ) -> usize {
        self.findings.push(Finding {
            severity,
            kind,
            path: path.map(Path::to_path_buf),
            snapshot: snapshot.map(str::to_string),
            message,
            repaired: false,
        });
        self.findings.len() - 1
    }
}

/// One image to check and who needs it.
struct Wanted {
    format: DiskFormat,
    used_by: Vec<String>,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl Orchestrator<'_> {
    /// Checks `domain`'s images, files and records, and with `repair` fixes
    /// what can be fixed safely (see the module documentation). Holds the
    /// domain lock throughout; finishes or rolls back an interrupted operation
    /// first, as every command does.
    pub async fn check(&self, domain: &str, repair: Option<CheckRepair>) -> Result<CheckReport> {
        let dom = self.lock(domain)?;
        let mut report = CheckReport {
            domain: domain.to_string(),
            running: false,
            repair,
            recovery: Vec::new(),
            images: Vec::new(),
            findings: Vec::new(),
        };
        if !self.snaps.open_intents(domain)?.is_empty() {
            // A recovery that fails is itself a finding: the rest of the
            // check still says what state the domain is in.
            match self.recover_with_removals(&dom).await {
                Ok(notes) => report.recovery = notes,
                Err(err) => report.recovery.push(format!("recovery failed: {err}")),
            }
        }
        let unfinished = self.snaps.open_intents(domain)?;
        for open in &unfinished {
            report.push(
                Severity::Error,
                FindingKind::UnfinishedOperation,
                None,
                Some(&open.intent.snapshot),
                format!(
                    "the interrupted {} of snapshot '{}' could not be finished (step {}): \
                     orphaned files were not looked for; run `vmsnap snapshot-recover {domain}` \
                     and check again",
                    open.intent.op.as_str(),
                    open.intent.snapshot,
                    open.intent.step
                ),
            );
        }

        let qmp = self.running_qmp(&dom).await?;
        report.running = qmp.is_some();
        let mut open_in_qemu: BTreeSet<PathBuf> = BTreeSet::new();
        if let Some(qmp) = qmp {
            let nodes = qmp.query_named_block_nodes().await;
            qmp.close().await;
            let nodes = nodes.map_err(qmp_error(domain, "query-named-block-nodes"))?;
            open_in_qemu.extend(nodes.iter().map(|n| PathBuf::from(&n.file)));
        }

        let chains = self.snaps.chains(domain)?;
        let snapshots = self.snaps.snapshots(domain)?;
        if report.running {
            // QEMU has every layer of the current chains open.
            open_in_qemu.extend(
                chains
                    .iter()
                    .flat_map(|c| c.layers.iter().map(|l| l.path.clone())),
            );
        }

        let wanted = wanted_images(&chains, &snapshots);
        for (path, want) in &wanted {
            let image = check_image(path, want, open_in_qemu.contains(path), repair, &mut report);
            report.images.push(image);
        }
        self.check_missing(&chains, &snapshots, &mut report);
        check_internal_snapshots(&snapshots, &mut report);
        if unfinished.is_empty() {
            self.check_orphans(&dom, &snapshots, &open_in_qemu, repair, &mut report)?;
        }
        report
            .findings
            .sort_by_key(|f| std::cmp::Reverse(f.severity));
        Ok(report)
    }

    /// Runs recovery and adds to its notes the files its clean-up removed
    /// (recovery reports only the ones it could not remove).
    async fn recover_with_removals(&self, dom: &Domain) -> Result<Vec<String>> {
        let before: Vec<PathBuf> = self
            .snaps
            .owned_files(&dom.name)?
            .into_iter()
            .filter(|f| f.exists())
            .collect();
        let mut notes = self.recover_locked(dom).await?;
        for file in before {
            if !file.exists() {
                notes.push(format!(
                    "removed {}, which nothing needs any more",
                    display(&file)
                ));
            }
        }
        Ok(notes)
    }

    /// Records naming files that are gone.
    fn check_missing(
        &self,
        chains: &[crate::disk::DiskChain],
        snapshots: &[StoredSnapshot],
        report: &mut CheckReport,
    ) {
        for chain in chains {
            for layer in &chain.layers {
                if !exists(&layer.path) {
                    report.push(
                        Severity::Corruption,
                        FindingKind::MissingDiskImage,
                        Some(&layer.path),
                        None,
                        format!(
                            "disk {} of domain {} needs image {}, which is missing: \
                             the domain cannot start; restore the file or revert to a snapshot",
                            chain.target,
                            report.domain,
                            display(&layer.path)
                        ),
                    );
                }
            }
        }
        for snapshot in snapshots {
            for (target, capture) in &snapshot.storage.disks {
                let Some(chain) = capture.chain() else {
                    continue;
                };
                let top = &chain.top().file;
                for layer in &chain.0 {
                    if exists(&layer.file) {
                        continue;
                    }
                    let role = match capture {
                        DiskCapture::External { .. } if &layer.file == top => "frozen image",
                        _ if &layer.file == top => "image",
                        _ => "backing image",
                    };
                    report.push(
                        Severity::Corruption,
                        FindingKind::MissingSnapshotImage,
                        Some(&layer.file),
                        Some(&snapshot.name),
                        format!(
                            "snapshot '{}' cannot be reverted: {role} {} of disk {target} is \
                             missing; `vmsnap snapshot-delete {} {} --metadata` forgets it",
                            snapshot.name,
                            display(&layer.file),
                            report.domain,
                            snapshot.name
                        ),
                    );
                }
            }
            if let MemorySnapshot::External { path } = &snapshot.meta.memory {
                if !exists(path) {
                    report.push(
                        Severity::Corruption,
                        FindingKind::MissingMemoryImage,
                        Some(path),
                        Some(&snapshot.name),
                        format!(
                            "snapshot '{}' cannot be reverted: memory image {} is missing; \
                             `vmsnap snapshot-delete {} {} --metadata` forgets it",
                            snapshot.name,
                            display(path),
                            report.domain,
                            snapshot.name
                        ),
                    );
                }
            }
        }
    }

    /// Files vmsnap made (recorded as its own, or in the domain's snapshot
    /// area of the state directory) that nothing needs; removed with a repair
    /// unless QEMU has them open.
    fn check_orphans(
        &self,
        dom: &Domain,
        snapshots: &[StoredSnapshot],
        open_in_qemu: &BTreeSet<PathBuf>,
        repair: Option<CheckRepair>,
        report: &mut CheckReport,
    ) -> Result<()> {
        let current = chains_of(&self.snaps.chains(&dom.name)?);
        let mut needed = needed_files(&current, snapshots);
        needed.extend(dom.config.disks.iter().map(|d| d.file.clone()));
        let owned: BTreeSet<PathBuf> = self.snaps.owned_files(&dom.name)?.into_iter().collect();

        let mut candidates: BTreeMap<PathBuf, bool> =
            owned.iter().map(|f| (f.clone(), true)).collect();
        let area = dom.paths.dir.join("snapshots");
        match std::fs::read_dir(&area) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let regular = entry.file_type().is_ok_and(|t| t.is_file());
                    if regular {
                        candidates.entry(path).or_insert(false);
                    } else if !needed.contains(&path) {
                        report.push(
                            Severity::Notice,
                            FindingKind::ForeignEntry,
                            Some(&path),
                            None,
                            format!(
                                "{} in vmsnap's snapshot area is not a regular file; \
                                 vmsnap did not make it and leaves it alone",
                                display(&path)
                            ),
                        );
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                report.push(
                    Severity::Error,
                    FindingKind::ImageUnreadable,
                    Some(&area),
                    None,
                    format!("cannot list {}: {err}", display(&area)),
                );
            }
        }

        let mut disown = Vec::new();
        for (file, recorded) in candidates {
            if needed.contains(&file) {
                continue;
            }
            if !exists(&file) {
                let at = report.push(
                    Severity::Notice,
                    FindingKind::StaleFileRecord,
                    Some(&file),
                    None,
                    format!(
                        "vmsnap recorded {} as its own, but the file is gone; \
                         `-r leaks` forgets the record",
                        display(&file)
                    ),
                );
                if repair.is_some() {
                    disown.push(file);
                    report.findings[at].repaired = true;
                }
                continue;
            }
            let what = orphan_kind(&file);
            let in_use = open_in_qemu.contains(&file);
            // Recorded files are vmsnap's to remove with any repair; the
            // others only with `all`: `snapshot-delete --metadata` may have
            // handed them back to the operator.
            let (kind, mode, whose) = if recorded {
                (FindingKind::OrphanFile, "leaks", "")
            } else {
                (
                    FindingKind::UnrecordedFile,
                    "all",
                    " and no longer recorded as vmsnap's (left by `snapshot-delete --metadata` \
                     or a lost record)",
                )
            };
            let at = report.push(
                Severity::Leak,
                kind,
                Some(&file),
                None,
                if in_use {
                    format!(
                        "{what} {} is needed neither by a snapshot nor by the current state{whose}, \
                         but QEMU still has it open: it can be removed once the domain is stopped",
                        display(&file)
                    )
                } else {
                    format!(
                        "{what} {} is needed neither by a snapshot nor by the current state{whose}; \
                         `-r {mode}` removes it",
                        display(&file)
                    )
                },
            );
            let allowed = match repair {
                Some(CheckRepair::All) => true,
                Some(CheckRepair::Leaks) => recorded,
                None => false,
            };
            if !allowed || in_use {
                continue;
            }
            match std::fs::remove_file(&file) {
                Ok(()) => {
                    report.findings[at].repaired = true;
                    report.findings[at].message =
                        format!("removed orphaned {what} {}", display(&file));
                    if recorded {
                        disown.push(file);
                    }
                }
                Err(err) => {
                    report.findings[at].message =
                        format!("cannot remove orphaned {what} {}: {err}", display(&file));
                }
            }
        }
        if !disown.is_empty() {
            self.snaps.disown(&dom.name, &disown)?;
        }
        Ok(())
    }
}

/// Every image the current chains and the snapshots need, with who needs it.
fn wanted_images(
    chains: &[crate::disk::DiskChain],
    snapshots: &[StoredSnapshot],
) -> BTreeMap<PathBuf, Wanted> {
    let mut wanted: BTreeMap<PathBuf, Wanted> = BTreeMap::new();
    let mut add = |path: &Path, format: DiskFormat, who: String| {
        let entry = wanted.entry(path.to_path_buf()).or_insert(Wanted {
            format,
            used_by: Vec::new(),
        });
        if !entry.used_by.contains(&who) {
            entry.used_by.push(who);
        }
    };
    for chain in chains {
        for layer in &chain.layers {
            add(
                &layer.path,
                layer.format,
                format!("current {}", chain.target),
            );
        }
    }
    for snapshot in snapshots {
        for (target, capture) in &snapshot.storage.disks {
            if let Some(chain) = capture.chain() {
                for layer in &chain.0 {
                    add(
                        &layer.file,
                        layer.format,
                        format!("snapshot '{}' {target}", snapshot.name),
                    );
                }
            }
        }
    }
    wanted
}

/// Whether a path names something (a dangling symlink counts as missing).
fn exists(path: &Path) -> bool {
    path.exists()
}

/// What an orphaned file of vmsnap's is, from the names vmsnap gives them.
fn orphan_kind(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("mem") => "memory image",
        Some("qcow2") => "overlay",
        _ => "file",
    }
}

/// Checks one image with the engine (qcow2) or for existence (raw), repairing
/// when asked and allowed, and records findings.
fn check_image(
    path: &Path,
    want: &Wanted,
    live: bool,
    repair: Option<CheckRepair>,
    report: &mut CheckReport,
) -> ImageReport {
    let mut image = ImageReport {
        path: path.to_path_buf(),
        format: want.format,
        used_by: want.used_by.clone(),
        exists: exists(path),
        live,
        check_errors: 0,
        corruptions: 0,
        leaks: 0,
        corruptions_fixed: 0,
        leaks_fixed: 0,
        internal_snapshots: Vec::new(),
        messages: Vec::new(),
    };
    if !image.exists || want.format == DiskFormat::Raw {
        // Missing files are reported per record by `check_missing`.
        return image;
    }
    let opened = if live {
        Qcow2Image::open_force_share(path)
    } else {
        match Qcow2Image::open_for_check(path, false) {
            Err(err) if err.kind() == vmsnap_qcow2::ErrorKind::Busy => {
                image.live = true;
                Qcow2Image::open_force_share(path)
            }
            other => other,
        }
    };
    let mut engine = match opened {
        Ok(engine) => engine,
        Err(err) => {
            let corrupt = err.kind() == vmsnap_qcow2::ErrorKind::Corrupt;
            image.check_errors = 1;
            report.push(
                if corrupt {
                    Severity::Corruption
                } else {
                    Severity::Error
                },
                if corrupt {
                    FindingKind::ImageCorrupt
                } else {
                    FindingKind::ImageUnreadable
                },
                Some(path),
                None,
                format!("cannot check image {}: {err}", display(path)),
            );
            return image;
        }
    };
    image.internal_snapshots = engine
        .snapshots()
        .into_iter()
        .map(|s| InternalSnapshot {
            name: s.name,
            vm_state_size: s.vm_state_size,
        })
        .collect();
    let mut verdict = match engine.check(None) {
        Ok(verdict) => verdict,
        Err(err) => {
            image.check_errors = 1;
            report.push(
                Severity::Error,
                FindingKind::ImageUnreadable,
                Some(path),
                None,
                format!("checking image {} failed: {err}", display(path)),
            );
            return image;
        }
    };
    drop(engine);
    let fixable = match repair {
        Some(CheckRepair::Leaks) => verdict.leaks > 0,
        Some(CheckRepair::All) => verdict.leaks > 0 || verdict.corruptions > 0,
        None => false,
    };
    let mut repair_failed = None;
    if fixable && !image.live {
        let mode = repair.map(CheckRepair::engine_mode);
        let repaired = Qcow2Image::open_for_check(path, true).and_then(|mut w| {
            let result = w.check(mode);
            w.flush()?;
            result
        });
        match repaired {
            Ok(after) => verdict = after,
            Err(err) => repair_failed = Some(err.to_string()),
        }
    }
    image.check_errors = verdict.check_errors;
    image.corruptions = verdict.corruptions;
    image.leaks = verdict.leaks;
    image.corruptions_fixed = verdict.corruptions_fixed;
    image.leaks_fixed = verdict.leaks_fixed;
    image.messages = verdict.messages;
    let caveat = if image.live {
        " (checked read-only while QEMU has it open; the result may be stale)"
    } else {
        ""
    };

    if image.corruptions_fixed > 0 {
        let at = report.push(
            Severity::Corruption,
            FindingKind::ImageCorrupt,
            Some(path),
            None,
            format!(
                "image {}: repaired {} corruption(s)",
                display(path),
                image.corruptions_fixed
            ),
        );
        report.findings[at].repaired = true;
    }
    if image.leaks_fixed > 0 {
        let at = report.push(
            Severity::Leak,
            FindingKind::ImageLeaks,
            Some(path),
            None,
            format!(
                "image {}: repaired {} leaked cluster(s)",
                display(path),
                image.leaks_fixed
            ),
        );
        report.findings[at].repaired = true;
    }
    if image.check_errors > 0 {
        report.push(
            Severity::Error,
            FindingKind::ImageUnreadable,
            Some(path),
            None,
            format!(
                "image {}: {} internal error(s) kept parts of the check from running{caveat}",
                display(path),
                image.check_errors
            ),
        );
    }
    if image.corruptions > 0 {
        let hint = if repair == Some(CheckRepair::All) {
            ""
        } else {
            "; `-r all` may fix refcount errors (back the image up first)"
        };
        report.push(
            Severity::Corruption,
            FindingKind::ImageCorrupt,
            Some(path),
            None,
            format!(
                "image {}: {} corruption(s){caveat}{hint}",
                display(path),
                image.corruptions
            ),
        );
    }
    if image.leaks > 0 {
        let hint = if repair.is_none() {
            "; `-r leaks` frees them"
        } else {
            ""
        };
        report.push(
            Severity::Leak,
            FindingKind::ImageLeaks,
            Some(path),
            None,
            format!(
                "image {}: {} leaked cluster(s){caveat}{hint}",
                display(path),
                image.leaks
            ),
        );
    }
    if fixable && image.live {
        report.push(
            Severity::Notice,
            FindingKind::RepairNeedsStop,
            Some(path),
            None,
            format!(
                "image {} is open in the running QEMU: repair needs the domain stopped",
                display(path)
            ),
        );
    }
    if let Some(err) = repair_failed {
        report.push(
            Severity::Error,
            FindingKind::ImageUnreadable,
            Some(path),
            None,
            format!("cannot repair image {}: {err}", display(path)),
        );
    }
    image
}

/// Recorded internal snapshots missing from their images, internal memory
/// snapshots without VM state, and internal snapshots no record knows.
fn check_internal_snapshots(snapshots: &[StoredSnapshot], report: &mut CheckReport) {
    let holds: BTreeMap<PathBuf, Vec<InternalSnapshot>> = report
        .images
        .iter()
        .filter(|i| i.exists && i.format == DiskFormat::Qcow2 && i.check_errors == 0)
        .map(|i| (i.path.clone(), i.internal_snapshots.clone()))
        .collect();
    let mut recorded: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    let mut findings = Vec::new();
    for snapshot in snapshots {
        for (target, capture) in &snapshot.storage.disks {
            let DiskCapture::Internal { chain, tag } = capture else {
                continue;
            };
            let image = &chain.top().file;
            recorded.insert((image.clone(), tag.clone()));
            let Some(tags) = holds.get(image) else {
                continue;
            };
            let held = tags.iter().find(|t| &t.name == tag);
            let memory_here = matches!(
                &snapshot.meta.memory,
                MemorySnapshot::Internal { vmstate_disk } if vmstate_disk == target
            );
            if let (Some(held), true) = (held, memory_here) {
                if held.vm_state_size == 0 {
                    findings.push((
                        Severity::Corruption,
                        FindingKind::MissingInternalMemory,
                        image.clone(),
                        Some(snapshot.name.clone()),
                        format!(
                            "snapshot '{}' cannot be reverted with its memory: internal snapshot \
                             '{tag}' in image {} holds no VM state",
                            snapshot.name,
                            display(image)
                        ),
                    ));
                }
            }
            if held.is_none() {
                findings.push((
                    Severity::Corruption,
                    FindingKind::MissingInternalSnapshot,
                    image.clone(),
                    Some(snapshot.name.clone()),
                    format!(
                        "snapshot '{}' cannot be reverted: image {} of disk {target} has no \
                         internal snapshot '{tag}'; `vmsnap snapshot-delete {} {} --metadata` \
                         forgets it",
                        snapshot.name,
                        display(image),
                        report.domain,
                        snapshot.name
                    ),
                ));
            }
        }
    }
    for (image, tags) in &holds {
        for InternalSnapshot { name: tag, .. } in tags {
            if recorded.contains(&(image.clone(), tag.clone())) {
                continue;
            }
            findings.push((
                Severity::Notice,
                FindingKind::UnrecordedInternalSnapshot,
                image.clone(),
                None,
                format!(
                    "image {} holds internal snapshot '{tag}' that no snapshot of domain {} \
                     records (made outside vmsnap, or its record was lost); \
                     `vmsnap img snapshot -d {tag} {}` removes it",
                    display(image),
                    report.domain,
                    display(image)
                ),
            ));
        }
    }
    for (severity, kind, path, snapshot, message) in findings {
        report.push(severity, kind, Some(&path), snapshot.as_deref(), message);
    }
}
