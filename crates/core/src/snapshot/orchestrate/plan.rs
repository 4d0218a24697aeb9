//! Pure decisions over the recorded chains: which files are still needed,
//! whether an image's live content is frozen for someone else, and whether a
//! deleted external snapshot's frozen image can be merged away. Kept free of
//! I/O so the rules behind promise 1 (never touch data another node needs)
//! and promise 3 (give storage back) can be tested on their own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::model::{Chain, Chains, DiskCapture, Layer};
use super::store::StoredSnapshot;
use crate::snapshot::meta::MemorySnapshot;

/// Every file the current state or any snapshot needs.
pub fn needed_files(current: &Chains, snapshots: &[StoredSnapshot]) -> BTreeSet<PathBuf> {
    let mut needed: BTreeSet<PathBuf> = current
        .values()
        .flat_map(|chain| chain.0.iter().map(|layer| layer.file.clone()))
        .collect();
    for snapshot in snapshots {
        needed.extend(snapshot.storage.image_files().map(Path::to_path_buf));
        if let MemorySnapshot::External { path } = &snapshot.meta.memory {
            needed.insert(path.clone());
        }
    }
    needed
}

/// Every chain that reads through layers: the current ones (if given) and
/// those of every snapshot in `snapshots`.
fn all_chains<'a>(
    current: Option<&'a Chains>,
    snapshots: &'a [StoredSnapshot],
) -> impl Iterator<Item = (&'a Chain, bool)> + 'a {
    let current_chains = current
        .into_iter()
        .flat_map(|chains| chains.values().map(|chain| (chain, false)));
    let snapshot_chains = snapshots.iter().flat_map(|snapshot| {
        snapshot
            .storage
            .disks
            .values()
            .filter_map(|capture| match capture {
                DiskCapture::Internal { chain, .. } => Some((chain, false)),
                DiskCapture::External { chain } => Some((chain, true)),
                DiskCapture::Excluded => None,
            })
    });
    current_chains.chain(snapshot_chains)
}

/// Whether the live (non-snapshot) content of `file` must stay unchanged:
/// it is frozen by an external snapshot, or it is a backing layer of a chain
/// (a snapshot's, or the current state's when `current` is given). An image
/// that is only the top of chains holding internal snapshots, or the top of
/// the current state being discarded, may be rewritten.
pub fn live_content_needed(
    file: &Path,
    current: Option<&Chains>,
    snapshots: &[StoredSnapshot],
) -> bool {
    all_chains(current, snapshots).any(|(chain, frozen_top)| {
        chain.below_top().iter().any(|layer| layer.file == file)
            || (frozen_top && chain.top().file == file)
    })
}

/// Whether some chain keeps internal snapshots in `file` (it is the top of a
/// snapshot's internal capture).
pub fn holds_internal_snapshots(file: &Path, snapshots: &[StoredSnapshot]) -> bool {
    snapshots.iter().any(|snapshot| {
        snapshot.storage.disks.values().any(|capture| {
            matches!(capture, DiskCapture::Internal { chain, .. } if chain.top().file == file)
        })
    })
}

/// The layers directly above `file` in any chain.
pub fn children(file: &Path, current: &Chains, snapshots: &[StoredSnapshot]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for (chain, _) in all_chains(Some(current), snapshots) {
        for pair in chain.0.windows(2) {
            if pair[0].file == file {
                out.insert(pair[1].file.clone());
            }
        }
    }
    out
}

/// A planned merge: `frozen` (no longer needed by itself) is pulled into its
/// only child `child`, whose chains then skip it; `base` is the layer below
/// `frozen`, the child's new backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The disk.
    pub target: String,
    /// The image that goes away.
    pub frozen: Layer,
    /// The image that absorbs its data.
    pub child: Layer,
    /// The child's new backing layer.
    pub base: Layer,
}

/// Plans the merge that gives back `frozen`'s storage once the snapshot that
/// froze it is gone (`snapshots` must no longer hold that snapshot). `None`
/// when the frozen image must stay: it is a configured disk (never ours to
/// remove), it still holds internal snapshots, others still read it directly
/// (several children), or its only child holds internal snapshots (whose
/// unallocated clusters read through to it and would change).
pub fn plan_merge(
    target: &str,
    frozen_chain: &Chain,
    owned: &BTreeSet<PathBuf>,
    current: &Chains,
    snapshots: &[StoredSnapshot],
) -> Option<Merge> {
    let frozen = frozen_chain.top();
    let base = frozen_chain.below_top().last()?;
    if !owned.contains(&frozen.file) || holds_internal_snapshots(&frozen.file, snapshots) {
        return None;
    }
    let frozen_elsewhere = all_chains(Some(current), snapshots)
        .any(|(chain, frozen_top)| frozen_top && chain.top().file == frozen.file);
    if frozen_elsewhere {
        return None;
    }
    let kids = children(&frozen.file, current, snapshots);
    if kids.len() != 1 {
        return None;
    }
    let child_file = kids.into_iter().next().expect("one child");
    if holds_internal_snapshots(&child_file, snapshots) {
        return None;
    }
    let child = all_chains(Some(current), snapshots)
        .flat_map(|(chain, _)| chain.0.iter())
        .find(|layer| layer.file == child_file)?
        .clone();
    Some(Merge {
        target: target.to_string(),
        frozen: frozen.clone(),
        child,
        base: base.clone(),
    })
}

/// `planned` followed by every other merge that can be done now, in the
/// order to run them: a layer whose freezing snapshot was deleted while
/// others still read it directly (a branch above it) stays, and becomes
/// mergeable only when a later delete takes that branch away. Each merge is
/// planned on the chains as the merges before it leave them, so a deep
/// chain collapses in one delete; each goes through [`plan_merge`]'s rules.
pub fn with_stale_merges(
    planned: Vec<Merge>,
    owned: &BTreeSet<PathBuf>,
    current: &Chains,
    snapshots: &[StoredSnapshot],
) -> Vec<Merge> {
    let mut current = current.clone();
    let mut snapshots = snapshots.to_vec();
    let mut merges = Vec::new();
    let mut take = |merge: Merge, current: &mut Chains, snapshots: &mut [StoredSnapshot]| {
        for chain in current.values_mut() {
            *chain = without_layer(chain, &merge.frozen.file);
        }
        for snapshot in snapshots.iter_mut() {
            for capture in snapshot.storage.disks.values_mut() {
                if let DiskCapture::Internal { chain, .. } | DiskCapture::External { chain } =
                    capture
                {
                    *chain = without_layer(chain, &merge.frozen.file);
                }
            }
        }
        merges.push(merge);
    };
    for merge in planned {
        take(merge, &mut current, &mut snapshots);
    }
    while let Some(merge) = layer_prefixes(&current, &snapshots)
        .iter()
        .find_map(|(target, prefix)| plan_merge(target, prefix, owned, &current, &snapshots))
    {
        take(merge, &mut current, &mut snapshots);
    }
    merges
}

/// Every layer below the top of some chain, as (disk, the chain up to it).
fn layer_prefixes(current: &Chains, snapshots: &[StoredSnapshot]) -> Vec<(String, Chain)> {
    let chains = current.iter().chain(snapshots.iter().flat_map(|snapshot| {
        snapshot
            .storage
            .disks
            .iter()
            .filter_map(|(target, capture)| capture.chain().map(|chain| (target, chain)))
    }));
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (target, chain) in chains {
        for depth in 1..chain.0.len() {
            if seen.insert(chain.0[depth - 1].file.clone()) {
                out.push((target.clone(), Chain(chain.0[..depth].to_vec())));
            }
        }
    }
    out
}

/// `chain` without `file` (the merged-away layer).
pub fn without_layer(chain: &Chain, file: &Path) -> Chain {
    Chain(
        chain
            .0
            .iter()
            .filter(|layer| layer.file != file)
            .cloned()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskFormat;
    use crate::snapshot::meta::{
        DiskSnapshotMode, DiskSnapshotRecord, SnapshotMeta, SnapshotState,
    };
    use crate::snapshot::orchestrate::model::SnapshotStorage;

    fn layer(name: &str) -> Layer {
        let format = if name == "base" {
            DiskFormat::Raw
        } else {
            DiskFormat::Qcow2
        };
        Layer::new(format!("/s/{name}"), format)
    }

    fn chain(names: &[&str]) -> Chain {
        Chain(names.iter().map(|n| layer(n)).collect())
    }

    fn snapshot(name: &str, capture: DiskCapture) -> StoredSnapshot {
        let external = matches!(capture, DiskCapture::External { .. });
        let top = capture.chain().unwrap().top().file.clone();
        StoredSnapshot {
            name: name.into(),
            seq: 0,
            meta: SnapshotMeta {
                name: name.into(),
                domain: "d".into(),
                description: None,
                parent: None,
                creation_time: 0,
                state: SnapshotState::DiskSnapshot,
                memory: MemorySnapshot::None,
                disks: vec![DiskSnapshotRecord {
                    target: "vda".into(),
                    mode: if external {
                        DiskSnapshotMode::External
                    } else {
                        DiskSnapshotMode::Internal
                    },
                    source: top,
                    source_format: "qcow2".into(),
                    overlay: None,
                    overlay_format: None,
                }],
                domain_config: String::new(),
                is_current: false,
            },
            storage: SnapshotStorage {
                disks: [("vda".to_string(), capture)].into_iter().collect(),
            },
        }
    }

    fn current(names: &[&str]) -> Chains {
        [("vda".to_string(), chain(names))].into_iter().collect()
    }

    fn owned(names: &[&str]) -> BTreeSet<PathBuf> {
        names
            .iter()
            .map(|n| PathBuf::from(format!("/s/{n}")))
            .collect()
    }

    #[test]
    fn frozen_image_with_one_child_merges_into_it() {
        // e1 froze o1; e2 froze o2 (above o1); current writes o3. Deleting e2
        // merges o2 into o3.
        let e1 = snapshot(
            "e1",
            DiskCapture::External {
                chain: chain(&["base", "o1"]),
            },
        );
        let cur = current(&["base", "o1", "o2", "o3"]);
        let merge = plan_merge(
            "vda",
            &chain(&["base", "o1", "o2"]),
            &owned(&["o1", "o2", "o3"]),
            &cur,
            &[e1],
        )
        .expect("mergeable");
        assert_eq!(merge.frozen.file, PathBuf::from("/s/o2"));
        assert_eq!(merge.child.file, PathBuf::from("/s/o3"));
        assert_eq!(merge.base.file, PathBuf::from("/s/o1"));
    }

    #[test]
    fn shared_or_configured_images_stay() {
        // Two children (a revert made a second branch above o1): keep o1.
        let other = snapshot(
            "x",
            DiskCapture::External {
                chain: chain(&["base", "o1", "o2"]),
            },
        );
        let cur = current(&["base", "o1", "o3"]);
        assert!(plan_merge(
            "vda",
            &chain(&["base", "o1"]),
            &owned(&["o1", "o2", "o3"]),
            &cur,
            &[other]
        )
        .is_none());
        // The configured base is never merged away.
        let cur = current(&["base", "o1"]);
        assert!(plan_merge("vda", &chain(&["base"]), &owned(&["o1"]), &cur, &[]).is_none());
        // The only child holds internal snapshots: its reads fall through.
        let int = snapshot(
            "i",
            DiskCapture::Internal {
                chain: chain(&["base", "o1", "o2"]),
                tag: "i".into(),
            },
        );
        let cur = current(&["base", "o1", "o2"]);
        assert!(plan_merge(
            "vda",
            &chain(&["base", "o1"]),
            &owned(&["o1", "o2"]),
            &cur,
            &[int]
        )
        .is_none());
    }

    #[test]
    fn layers_left_behind_by_earlier_deletes_merge_once_their_branch_is_gone() {
        // o1's snapshot went while two branches read it (o2, kept by x, and
        // the current o3). Now x is gone too: o1 has one child left.
        let cur = current(&["base", "o1", "o3"]);
        let owned = owned(&["o1", "o3"]);
        let merges = with_stale_merges(Vec::new(), &owned, &cur, &[]);
        assert_eq!(merges.len(), 1, "{merges:?}");
        assert_eq!(merges[0].frozen.file, PathBuf::from("/s/o1"));
        assert_eq!(merges[0].child.file, PathBuf::from("/s/o3"));
        assert_eq!(merges[0].base.file, PathBuf::from("/s/base"));
        // While x still reads o1 through o2, o1 stays.
        let x = snapshot(
            "x",
            DiskCapture::External {
                chain: chain(&["base", "o1", "o2"]),
            },
        );
        let owned_x = super::tests::owned(&["o1", "o2", "o3"]);
        assert!(with_stale_merges(Vec::new(), &owned_x, &cur, std::slice::from_ref(&x)).is_empty());
        // A deep chain collapses in order, each merge on the chain the one
        // before leaves: o1 into o2 (over base), then o2 into o3 (over base).
        let deep = current(&["base", "o1", "o2", "o3"]);
        let merges = with_stale_merges(Vec::new(), &owned_x, &deep, &[]);
        fn name(layer: &Layer) -> &str {
            layer.file.to_str().unwrap().trim_start_matches("/s/")
        }
        let steps: Vec<(&str, &str, &str)> = merges
            .iter()
            .map(|m| (name(&m.frozen), name(&m.child), name(&m.base)))
            .collect();
        assert_eq!(steps, [("o1", "o2", "base"), ("o2", "o3", "base")]);
        // A merge the delete planned itself comes first and is not repeated.
        let planned = vec![merges[0].clone()];
        assert_eq!(with_stale_merges(planned, &owned_x, &deep, &[]), merges);
    }

    #[test]
    fn live_content_rules() {
        let int = snapshot(
            "i",
            DiskCapture::Internal {
                chain: chain(&["base", "o1"]),
                tag: "i".into(),
            },
        );
        let ext = snapshot(
            "e",
            DiskCapture::External {
                chain: chain(&["base", "o1"]),
            },
        );
        let cur = current(&["base", "o1"]);
        let o1 = Path::new("/s/o1");
        // Holding an internal snapshot only: its live content may be replaced.
        assert!(!live_content_needed(o1, None, std::slice::from_ref(&int)));
        // Frozen by an external snapshot: never.
        assert!(live_content_needed(o1, None, &[int.clone(), ext]));
        // Backing of the current state (when it is kept): never.
        let cur_above = current(&["base", "o1", "o2"]);
        assert!(live_content_needed(
            o1,
            Some(&cur_above),
            std::slice::from_ref(&int)
        ));
        assert!(!live_content_needed(o1, Some(&cur), &[int]));
        let needed = needed_files(&cur_above, &[]);
        assert!(needed.contains(Path::new("/s/o2")) && needed.contains(Path::new("/s/base")));
    }
}
