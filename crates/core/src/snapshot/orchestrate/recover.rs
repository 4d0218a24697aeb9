//! Recovery: what the next command does about an operation a killed vmsnap
//! (or a killed QEMU) left half done, and the clean-up every command runs.
//! It rolls back or finishes each open journal entry, repairs images the
//! qcow2 engine was changing, settles QEMU jobs the dead process started,
//! and removes files nothing needs (DESIGN §5.4).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::json;
use vmsnap_qmp::Qmp;

use super::error::Result;
use super::model::chains_of;
use super::offline;
use super::ops::{enable_discard, now_unix, Domain, Orchestrator, JOB_TIMEOUT};
use super::plan::needed_files;
use super::runtime::qmp_error;
use super::store::Change;
use crate::config::DiskFormat;
use crate::disk::{file_node_name, DiskChain};

impl Orchestrator<'_> {
    /// Finishes or rolls back what a killed vmsnap left on `domain` and
    /// removes files nothing needs; returns what it did, one line each.
    pub async fn recover(&self, domain: &str) -> Result<Vec<String>> {
        let dom = self.lock(domain)?;
        self.recover_locked(&dom).await
    }

    pub(super) async fn recover_locked(&self, dom: &Domain) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let intents = self.snaps.open_intents(&dom.name)?;
        let qmp = self.running_qmp(dom).await?;
        if let Some(qmp) = &qmp {
            if !intents.is_empty() {
                self.adopt_live_chains(dom, qmp, &mut notes).await?;
            }
        }
        for open in intents {
            let intent = &open.intent;
            let mut remaining = Vec::new();
            let tags = if intent.committed {
                &intent.doomed_tags
            } else {
                &intent.new_tags
            };
            for (image, tag) in tags {
                if let Err(err) = self.delete_tag(dom, qmp.as_ref(), image, tag).await {
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
            if remaining.is_empty() {
                self.snaps.close(open.id)?;
                notes.push(format!(
                    "{} the interrupted {} of snapshot '{}'",
                    if intent.committed {
                        "finished"
                    } else {
                        "rolled back"
                    },
                    intent.op.as_str(),
                    intent.snapshot
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
            }
        }
        if let Some(qmp) = qmp {
            self.release_unneeded_nodes(dom, &qmp).await?;
            qmp.close().await;
        }
        notes.extend(self.collect_garbage(dom)?);
        Ok(notes)
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
                if !offline::live_has_tag(&dom.name, qmp, &layer.node_name, tag).await? {
                    return Ok(());
                }
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
                qmp.execute("blockdev-reopen", Some(reopen(false)))
                    .await
                    .map_err(qmp_error(&dom.name, "blockdev-reopen"))?;
                let job = format!("vmsnap-delete-{}", now_unix());
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
