//! The snapshot tree of one domain: validation, virsh `snapshot-list`
//! queries and the planning of deletes, all on metadata alone.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::error::SnapshotMetaError;
use super::meta::{DiskSnapshotRecord, MemorySnapshot, SnapshotKind, SnapshotMeta, SnapshotState};

/// A domain's snapshots with their parent links checked: names unique,
/// parents present, no cycles, at most one current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTree {
    /// Keyed by name for lookups; orders are computed per query.
    nodes: BTreeMap<String, SnapshotMeta>,
}

/// Which snapshots `snapshot-list` shows, one field per virsh flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// `--from S` (or `--current` resolved to a name): only S's children.
    pub from: Option<String>,
    /// `--descendants`: with `from`, all descendants instead of children.
    pub descendants: bool,
    /// `--roots`: only snapshots without a parent.
    pub roots: bool,
    /// `--leaves`: only snapshots without children.
    pub leaves: bool,
    /// `--no-leaves`: only snapshots with children.
    pub no_leaves: bool,
    /// `--active`: full snapshots of a running or paused guest.
    pub active: bool,
    /// `--inactive`: snapshots of a stopped domain.
    pub inactive: bool,
    /// `--disk-only`: disk-only snapshots of a running guest.
    pub disk_only: bool,
    /// `--internal`: memory and disks inside the images.
    pub internal: bool,
    /// `--external`: memory or some disk outside the images.
    pub external: bool,
    /// `--topological`: parents before children instead of name order.
    pub topological: bool,
}

/// The virsh `snapshot-list` options that shape output rather than
/// selection, kept apart so their exclusions can be checked in one place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListOutputOptions {
    /// `--tree`
    pub tree: bool,
    /// `--name`
    pub name: bool,
    /// `--parent`
    pub parent: bool,
    /// `--current` was given (as the start of `--from`).
    pub current: bool,
}

impl ListQuery {
    /// Refuses option combinations virsh refuses, with virsh's messages.
    pub fn check_options(&self, out: ListOutputOptions) -> Result<(), SnapshotMetaError> {
        let exclusive = |a: &str, b: &str| {
            Err(SnapshotMetaError::BadOptions(format!(
                "Options --{a} and --{b} are mutually exclusive"
            )))
        };
        let from = self.from.is_some() && !out.current;
        if out.tree && out.name {
            return exclusive("tree", "name");
        }
        if out.parent && self.roots {
            return exclusive("parent", "roots");
        }
        if out.parent && out.tree {
            return exclusive("parent", "tree");
        }
        if self.roots && out.tree {
            return exclusive("roots", "tree");
        }
        if self.roots && from {
            return exclusive("roots", "from");
        }
        if self.roots && out.current {
            return exclusive("roots", "current");
        }
        let filters = [
            ("leaves", self.leaves),
            ("no-leaves", self.no_leaves),
            ("inactive", self.inactive),
            ("active", self.active),
            ("disk-only", self.disk_only),
            ("internal", self.internal),
            ("external", self.external),
        ];
        if out.tree {
            if let Some((option, _)) = filters.iter().find(|(_, on)| *on) {
                return Err(SnapshotMetaError::BadOptions(format!(
                    "--{option} and --tree are mutually exclusive"
                )));
            }
        }
        if self.descendants && self.from.is_none() {
            return Err(SnapshotMetaError::BadOptions(
                "--descendants requires either --from or --current".into(),
            ));
        }
        Ok(())
    }
}

/// How far `snapshot-delete` reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeleteScope {
    /// The snapshot alone; its children move up to its parent.
    Node,
    /// `--children`: the snapshot and all its descendants.
    WithChildren,
    /// `--children-only`: all descendants, keeping the snapshot.
    ChildrenOnly,
}

/// One child moved up to a new parent by a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reparent {
    /// The surviving child.
    pub child: String,
    /// Its new parent (`None`: it becomes a root).
    pub new_parent: Option<String>,
}

/// What a delete will do to the metadata, computed before any storage is
/// touched so the orchestrator can journal it and crash-recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePlan {
    /// The snapshot named on the command line.
    pub target: String,
    /// How far the delete reaches.
    pub scope: DeleteScope,
    /// `--metadata`: forget the snapshots, leave their data alone.
    pub metadata_only: bool,
    /// Snapshots to remove, every child before its parent, so storage can
    /// be merged bottom-up.
    pub removed: Vec<String>,
    /// Children of removed snapshots that survive, with their new parents.
    pub reparented: Vec<Reparent>,
    /// The current snapshot before the delete.
    pub current_before: Option<String>,
    /// The current snapshot after it (libvirt: a removed current moves up
    /// to the nearest surviving ancestor; none if the root went).
    pub current_after: Option<String>,
}

impl SnapshotTree {
    /// Builds and checks a tree from stored records.
    pub fn new(metas: Vec<SnapshotMeta>) -> Result<Self, SnapshotMetaError> {
        let mut nodes = BTreeMap::new();
        let mut current: Option<String> = None;
        for meta in metas {
            if meta.is_current {
                if let Some(first) = &current {
                    return Err(SnapshotMetaError::SeveralCurrent {
                        first: first.clone(),
                        second: meta.name.clone(),
                    });
                }
                current = Some(meta.name.clone());
            }
            if nodes.contains_key(&meta.name) {
                return Err(SnapshotMetaError::Duplicate { name: meta.name });
            }
            nodes.insert(meta.name.clone(), meta);
        }
        let tree = Self { nodes };
        tree.check_links()?;
        Ok(tree)
    }

    fn check_links(&self) -> Result<(), SnapshotMetaError> {
        for meta in self.nodes.values() {
            if let Some(parent) = &meta.parent {
                if !self.nodes.contains_key(parent) {
                    return Err(SnapshotMetaError::MissingParent {
                        name: meta.name.clone(),
                        parent: parent.clone(),
                    });
                }
            }
        }
        // Walk up from every node; a walk longer than the node count loops.
        let mut cleared: BTreeSet<&str> = BTreeSet::new();
        for start in self.nodes.keys() {
            let mut path: Vec<&str> = Vec::new();
            let mut on_path: BTreeSet<&str> = BTreeSet::new();
            let mut at = Some(start.as_str());
            while let Some(name) = at {
                if cleared.contains(name) {
                    break;
                }
                if !on_path.insert(name) {
                    let from = path.iter().position(|n| *n == name).unwrap_or(0);
                    return Err(SnapshotMetaError::Cycle {
                        names: path[from..].join(", "),
                    });
                }
                path.push(name);
                at = self.nodes[name].parent.as_deref();
            }
            cleared.extend(path);
        }
        Ok(())
    }

    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the domain has no snapshots.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A snapshot by name, or virsh's "not found" error.
    pub fn get(&self, name: &str) -> Result<&SnapshotMeta, SnapshotMetaError> {
        self.nodes
            .get(name)
            .ok_or_else(|| SnapshotMetaError::NotFound {
                name: name.to_string(),
            })
    }

    /// Resolves virsh's `SNAPSHOT | --current` argument pair
    /// (`virshLookupSnapshot`): exactly one must be given; `option` is the
    /// argument's option name (`snapshotname`, `from`) for the messages.
    pub fn resolve(
        &self,
        name: Option<&str>,
        current: bool,
        option: &str,
    ) -> Result<&SnapshotMeta, SnapshotMetaError> {
        match (name, current) {
            (Some(_), true) => Err(SnapshotMetaError::BadOptions(format!(
                "--{option} and --current are mutually exclusive"
            ))),
            (Some(n), false) => self.get(n),
            (None, true) => self.current().ok_or(SnapshotMetaError::CurrentNotSet),
            (None, false) => Err(SnapshotMetaError::BadOptions(format!(
                "--{option} or --current is required"
            ))),
        }
    }

    /// The name `snapshot-current --name` prints, or virsh's error.
    pub fn current_name(&self, domain: &str) -> Result<&str, SnapshotMetaError> {
        self.current()
            .map(|m| m.name.as_str())
            .ok_or_else(|| SnapshotMetaError::NoCurrent {
                domain: domain.to_string(),
            })
    }

    /// The name `snapshot-parent` prints, or virsh's "has no parent" error.
    pub fn parent_name(&self, name: &str) -> Result<&str, SnapshotMetaError> {
        self.get(name)?
            .parent
            .as_deref()
            .ok_or_else(|| SnapshotMetaError::NoParent {
                name: name.to_string(),
            })
    }

    /// Whether a snapshot of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// Every record, in name order (the store writes them back from here).
    pub fn metas(&self) -> impl Iterator<Item = &SnapshotMeta> {
        self.nodes.values()
    }

    /// The current snapshot, if any.
    pub fn current(&self) -> Option<&SnapshotMeta> {
        self.nodes.values().find(|m| m.is_current)
    }

    /// The parent of a snapshot; `Ok(None)` for a root.
    pub fn parent(&self, name: &str) -> Result<Option<&SnapshotMeta>, SnapshotMetaError> {
        Ok(self.get(name)?.parent.as_deref().map(|p| &self.nodes[p]))
    }

    /// Direct children, in virsh's name order.
    pub fn children(&self, name: &str) -> Result<Vec<&SnapshotMeta>, SnapshotMetaError> {
        self.get(name)?;
        Ok(self.sorted(self.children_unchecked(name)))
    }

    fn children_unchecked(&self, name: &str) -> std::vec::IntoIter<&SnapshotMeta> {
        self.nodes
            .values()
            .filter(|m| m.parent.as_deref() == Some(name))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// All descendants (children, their children, ...), in name order.
    pub fn descendants(&self, name: &str) -> Result<Vec<&SnapshotMeta>, SnapshotMetaError> {
        self.get(name)?;
        Ok(self.sorted(self.descendants_preorder(name).into_iter()))
    }

    /// Descendants depth first, parents before children, siblings newest
    /// first: the order libvirt's `--topological` listing produces (it keeps
    /// children newest first and walks them depth first).
    fn descendants_preorder(&self, name: &str) -> Vec<&SnapshotMeta> {
        let mut out = Vec::new();
        let mut stack: Vec<&SnapshotMeta> = self.children_newest_first(Some(name));
        stack.reverse();
        while let Some(node) = stack.pop() {
            out.push(node);
            let mut kids = self.children_newest_first(Some(&node.name));
            kids.reverse();
            stack.extend(kids);
        }
        out
    }

    /// Children of `parent` (roots for `None`), newest first; snapshots
    /// taken in the same second fall back to reverse name order.
    fn children_newest_first(&self, parent: Option<&str>) -> Vec<&SnapshotMeta> {
        let mut kids: Vec<&SnapshotMeta> = self
            .nodes
            .values()
            .filter(|m| m.parent.as_deref() == parent)
            .collect();
        kids.sort_by(|a, b| {
            b.creation_time
                .cmp(&a.creation_time)
                .then_with(|| b.name.cmp(&a.name))
        });
        kids
    }

    /// Snapshots without a parent, in name order.
    pub fn roots(&self) -> Vec<&SnapshotMeta> {
        self.sorted(self.nodes.values().filter(|m| m.parent.is_none()))
    }

    /// Snapshots without children, in name order.
    pub fn leaves(&self) -> Vec<&SnapshotMeta> {
        self.sorted(self.nodes.values().filter(|m| self.is_leaf(&m.name)))
    }

    fn is_leaf(&self, name: &str) -> bool {
        self.children_unchecked(name).next().is_none()
    }

    /// Every snapshot with parents before children, in libvirt's
    /// `--topological` order: each root (newest first) followed by its
    /// subtree depth first, children newest first.
    pub fn topological(&self) -> Vec<&SnapshotMeta> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for root in self.children_newest_first(None) {
            out.push(root);
            out.extend(self.descendants_preorder(&root.name));
        }
        out
    }

    /// virsh's name order: case-insensitive (`strcasecmp`), ties by bytes.
    fn sorted<'a>(&self, items: impl Iterator<Item = &'a SnapshotMeta>) -> Vec<&'a SnapshotMeta> {
        let mut v: Vec<&SnapshotMeta> = items.collect();
        v.sort_by(|a, b| name_order(&a.name, &b.name));
        v
    }

    /// The selection `snapshot-list` prints, in its order.
    pub fn list(&self, query: &ListQuery) -> Result<Vec<&SnapshotMeta>, SnapshotMetaError> {
        let candidates: Vec<&SnapshotMeta> = match &query.from {
            Some(from) => {
                self.get(from)?;
                if query.descendants {
                    self.descendants_preorder(from)
                } else {
                    self.children_newest_first(Some(from))
                }
            }
            None => self.topological(),
        };
        let status_filter = query.active || query.inactive || query.disk_only;
        let location_filter = query.internal || query.external;
        let picked = candidates.into_iter().filter(|m| {
            if query.roots && m.parent.is_some() {
                return false;
            }
            if query.leaves != query.no_leaves {
                let leaf = self.is_leaf(&m.name);
                if (query.leaves && !leaf) || (query.no_leaves && leaf) {
                    return false;
                }
            }
            if status_filter {
                let ok = match m.state {
                    SnapshotState::Shutoff => query.inactive,
                    SnapshotState::DiskSnapshot => query.disk_only,
                    SnapshotState::Running | SnapshotState::Paused => query.active,
                };
                if !ok {
                    return false;
                }
            }
            if location_filter {
                let ok = if m.is_external() {
                    query.external
                } else {
                    query.internal
                };
                if !ok {
                    return false;
                }
            }
            true
        });
        if query.topological {
            Ok(picked.collect())
        } else {
            Ok(self.sorted(picked))
        }
    }

    /// What `snapshot-list --tree [--from S]` draws: each entry with its
    /// parent inside the drawing (`None` marks where a tree starts), in
    /// name order.
    pub fn tree_entries(&self, from: Option<&str>) -> Result<Vec<TreeEntry>, SnapshotMetaError> {
        let metas: Vec<&SnapshotMeta> = match from {
            Some(start) => {
                let mut v = vec![self.get(start)?];
                v.extend(self.descendants_preorder(start));
                self.sorted(v.into_iter())
            }
            None => self.sorted(self.nodes.values()),
        };
        Ok(metas
            .into_iter()
            .map(|m| TreeEntry {
                name: m.name.clone(),
                parent: if Some(m.name.as_str()) == from {
                    None
                } else {
                    m.parent.clone()
                },
            })
            .collect())
    }

    /// Adds a new snapshot taken on top of the current one, which it
    /// replaces as current. Its `parent` must already name the current
    /// snapshot (or be `None` when there is none).
    pub fn insert_created(&mut self, mut meta: SnapshotMeta) -> Result<(), SnapshotMetaError> {
        meta.validate()?;
        if self.nodes.contains_key(&meta.name) {
            return Err(SnapshotMetaError::Duplicate { name: meta.name });
        }
        let current = self.current().map(|m| m.name.clone());
        if meta.parent != current {
            return Err(SnapshotMetaError::Inconsistent {
                name: meta.name.clone(),
                reason: format!(
                    "its parent is {} but the current snapshot is {}",
                    meta.parent.as_deref().unwrap_or("none"),
                    current.as_deref().unwrap_or("none")
                ),
            });
        }
        for m in self.nodes.values_mut() {
            m.is_current = false;
        }
        meta.is_current = true;
        self.nodes.insert(meta.name.clone(), meta);
        Ok(())
    }

    /// Adds a record imported with `snapshot-create --redefine`: its parent
    /// must already exist (libvirt: redefine in topological order); it
    /// becomes current only when asked (`--current`).
    pub fn insert_redefined(
        &mut self,
        mut meta: SnapshotMeta,
        make_current: bool,
    ) -> Result<(), SnapshotMetaError> {
        meta.validate()?;
        if self.nodes.contains_key(&meta.name) {
            return Err(SnapshotMetaError::Duplicate { name: meta.name });
        }
        if let Some(parent) = &meta.parent {
            if !self.nodes.contains_key(parent) {
                return Err(SnapshotMetaError::MissingParent {
                    name: meta.name.clone(),
                    parent: parent.clone(),
                });
            }
        }
        meta.is_current = false;
        let name = meta.name.clone();
        self.nodes.insert(name.clone(), meta);
        if make_current {
            self.set_current(&name)?;
        }
        Ok(())
    }

    /// Makes a snapshot current (after a revert, or `snapshot-current NAME`).
    pub fn set_current(&mut self, name: &str) -> Result<(), SnapshotMetaError> {
        self.get(name)?;
        for m in self.nodes.values_mut() {
            m.is_current = m.name == name;
        }
        Ok(())
    }

    /// Computes a delete without changing anything.
    pub fn plan_delete(
        &self,
        name: &str,
        scope: DeleteScope,
        metadata_only: bool,
    ) -> Result<DeletePlan, SnapshotMetaError> {
        let target = self.get(name)?;
        let current_before = self.current().map(|m| m.name.clone());
        let mut subtree = self.descendants_preorder(name);
        subtree.reverse(); // children before parents
        let mut removed: Vec<String> = match scope {
            DeleteScope::Node => Vec::new(),
            DeleteScope::WithChildren | DeleteScope::ChildrenOnly => {
                subtree.iter().map(|m| m.name.clone()).collect()
            }
        };
        let mut reparented = Vec::new();
        if scope != DeleteScope::ChildrenOnly {
            removed.push(name.to_string());
        }
        if scope == DeleteScope::Node {
            let mut children = self.children_newest_first(Some(name));
            children.sort_by(|a, b| name_order(&a.name, &b.name));
            for child in children {
                reparented.push(Reparent {
                    child: child.name.clone(),
                    new_parent: target.parent.clone(),
                });
            }
        }
        let removed_set: BTreeSet<&str> = removed.iter().map(String::as_str).collect();
        let current_after = match &current_before {
            Some(cur) if removed_set.contains(cur.as_str()) => {
                // Nearest surviving ancestor of the removed current snapshot.
                let mut at = self.nodes[cur].parent.as_deref();
                while let Some(a) = at {
                    if !removed_set.contains(a) {
                        break;
                    }
                    at = self.nodes[a].parent.as_deref();
                }
                at.map(str::to_string)
            }
            other => other.clone(),
        };
        Ok(DeletePlan {
            target: name.to_string(),
            scope,
            metadata_only,
            removed,
            reparented,
            current_before,
            current_after,
        })
    }

    /// Applies a delete plan made by [`Self::plan_delete`] on this tree.
    pub fn apply_delete(&mut self, plan: &DeletePlan) -> Result<(), SnapshotMetaError> {
        for name in &plan.removed {
            self.get(name)?;
        }
        for r in &plan.reparented {
            let child =
                self.nodes
                    .get_mut(&r.child)
                    .ok_or_else(|| SnapshotMetaError::NotFound {
                        name: r.child.clone(),
                    })?;
            child.parent = r.new_parent.clone();
        }
        for name in &plan.removed {
            self.nodes.remove(name);
        }
        for m in self.nodes.values_mut() {
            m.is_current = Some(&m.name) == plan.current_after.as_ref();
        }
        self.check_links()
    }
}

/// A snapshot as `--json` output shows it: the record plus what the tree
/// knows about it (kind, location, children), borrowed from the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotSummary<'a> {
    /// Snapshot name.
    pub name: &'a str,
    /// Owning domain.
    pub domain: &'a str,
    /// User's description.
    pub description: Option<&'a str>,
    /// Parent snapshot, `None` for a root.
    pub parent: Option<&'a str>,
    /// Seconds since the Unix epoch.
    pub creation_time: i64,
    /// Captured domain state.
    pub state: SnapshotState,
    /// Internal, external or disk-only.
    pub kind: SnapshotKind,
    /// `internal` or `external`, as `snapshot-info` says it.
    pub location: &'static str,
    /// Whether it is the current snapshot.
    pub current: bool,
    /// Number of direct children.
    pub children: usize,
    /// Number of descendants.
    pub descendants: usize,
    /// Where memory went.
    pub memory: &'a MemorySnapshot,
    /// Per-disk records.
    pub disks: &'a [DiskSnapshotRecord],
}

impl SnapshotTree {
    /// The `--json` view of one snapshot.
    pub fn summary(&self, name: &str) -> Result<SnapshotSummary<'_>, SnapshotMetaError> {
        let m = self.get(name)?;
        Ok(SnapshotSummary {
            name: &m.name,
            domain: &m.domain,
            description: m.description.as_deref(),
            parent: m.parent.as_deref(),
            creation_time: m.creation_time,
            state: m.state,
            kind: m.kind(),
            location: if m.is_external() {
                "external"
            } else {
                "internal"
            },
            current: m.is_current,
            children: self.children_unchecked(name).len(),
            descendants: self.descendants_preorder(name).len(),
            memory: &m.memory,
            disks: &m.disks,
        })
    }
}

/// One line's worth of a `--tree` drawing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// The snapshot's name.
    pub name: String,
    /// Its parent within the drawing; `None` starts a tree.
    pub parent: Option<String>,
}

/// virsh's sort (`vshStrcasecmp`), made total by falling back to bytes.
pub fn name_order(a: &str, b: &str) -> std::cmp::Ordering {
    let fold = |s: &str| {
        s.bytes()
            .map(|c| c.to_ascii_lowercase())
            .collect::<Vec<u8>>()
    };
    fold(a).cmp(&fold(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::snapshot::error::SnapshotMetaErrorKind;
    use crate::snapshot::meta::tests::{external_meta, internal_meta};
    use crate::snapshot::meta::MemorySnapshot;

    fn names(v: &[&SnapshotMeta]) -> Vec<String> {
        v.iter().map(|m| m.name.clone()).collect()
    }

    /// Replays issue 4's fan-out script (virsh's own tests/virsh-snapshot):
    /// create s1, s3, s2; revert s3; create s6, s5; revert s6; create s4;
    /// revert s1; create s7, s8.
    pub(crate) fn fan_out() -> SnapshotTree {
        let mut tree = SnapshotTree::default();
        let mut clock = 1_000;
        let mut create = |tree: &mut SnapshotTree, name: &str| {
            clock += 10;
            let parent = tree.current().map(|m| m.name.clone());
            let meta = internal_meta(name, parent.as_deref(), clock);
            tree.insert_created(meta).unwrap();
        };
        create(&mut tree, "s1");
        create(&mut tree, "s3");
        create(&mut tree, "s2");
        tree.set_current("s3").unwrap();
        create(&mut tree, "s6");
        create(&mut tree, "s5");
        tree.set_current("s6").unwrap();
        create(&mut tree, "s4");
        tree.set_current("s1").unwrap();
        create(&mut tree, "s7");
        create(&mut tree, "s8");
        tree
    }

    #[test]
    fn fan_out_parent_links() {
        let tree = fan_out();
        let parent_of = |n: &str| tree.get(n).unwrap().parent.clone();
        assert_eq!(parent_of("s1"), None);
        assert_eq!(parent_of("s3").as_deref(), Some("s1"));
        assert_eq!(parent_of("s2").as_deref(), Some("s3"));
        assert_eq!(parent_of("s6").as_deref(), Some("s3"));
        assert_eq!(parent_of("s5").as_deref(), Some("s6"));
        assert_eq!(parent_of("s4").as_deref(), Some("s6"));
        assert_eq!(parent_of("s7").as_deref(), Some("s1"));
        assert_eq!(parent_of("s8").as_deref(), Some("s7"));
        assert_eq!(tree.current().unwrap().name, "s8");
        assert_eq!(tree.metas().filter(|m| m.is_current).count(), 1);
    }

    #[test]
    fn fan_out_queries() {
        let tree = fan_out();
        assert_eq!(names(&tree.roots()), ["s1"]);
        assert_eq!(names(&tree.leaves()), ["s2", "s4", "s5", "s8"]);
        assert_eq!(names(&tree.children("s3").unwrap()), ["s2", "s6"]);
        assert_eq!(
            names(&tree.descendants("s3").unwrap()),
            ["s2", "s4", "s5", "s6"]
        );
        assert_eq!(tree.parent("s5").unwrap().unwrap().name, "s6");
        assert!(tree.parent("s1").unwrap().is_none());
        // Topological: what virsh 9.0 printed for this script
        // (`snapshot-list test --topological --name` on the test driver).
        assert_eq!(
            names(&tree.topological()),
            ["s1", "s7", "s8", "s3", "s6", "s4", "s5", "s2"]
        );
        let q = |f: fn(&mut ListQuery)| {
            let mut q = ListQuery::default();
            f(&mut q);
            names(&tree.list(&q).unwrap())
        };
        assert_eq!(q(|_| {}), ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]);
        assert_eq!(q(|q| q.roots = true), ["s1"]);
        assert_eq!(q(|q| q.leaves = true), ["s2", "s4", "s5", "s8"]);
        assert_eq!(q(|q| q.no_leaves = true), ["s1", "s3", "s6", "s7"]);
        assert_eq!(
            q(|q| {
                q.leaves = true;
                q.no_leaves = true;
            })
            .len(),
            8
        );
        assert_eq!(q(|q| q.from = Some("s3".into())), ["s2", "s6"]);
        assert_eq!(
            q(|q| {
                q.from = Some("s3".into());
                q.descendants = true;
            }),
            ["s2", "s4", "s5", "s6"]
        );
        assert_eq!(
            q(|q| {
                q.from = Some("s3".into());
                q.descendants = true;
                q.topological = true;
            }),
            ["s6", "s4", "s5", "s2"]
        );
        assert_eq!(
            q(|q| q.topological = true),
            ["s1", "s7", "s8", "s3", "s6", "s4", "s5", "s2"]
        );
        assert_eq!(
            q(|q| {
                q.from = Some("s1".into());
                q.leaves = true;
                q.descendants = true;
            }),
            ["s2", "s4", "s5", "s8"]
        );
        let err = tree
            .list(&ListQuery {
                from: Some("nope".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Domain snapshot not found: no domain snapshot with matching name 'nope'"
        );
    }

    #[test]
    fn status_and_location_filters_follow_libvirt() {
        // a: internal running; b: external running; c: internal disk-only
        // of a running guest; d: internal of a stopped domain.
        let a = internal_meta("a", None, 1);
        let b = external_meta("b", Some("a"), 2);
        let mut c = internal_meta("c", Some("b"), 3);
        c.memory = MemorySnapshot::None;
        c.state = SnapshotState::DiskSnapshot;
        let mut d = internal_meta("d", Some("c"), 4);
        d.memory = MemorySnapshot::None;
        d.state = SnapshotState::Shutoff;
        let tree = SnapshotTree::new(vec![a, b, c, d]).unwrap();
        let q = |f: fn(&mut ListQuery)| {
            let mut q = ListQuery::default();
            f(&mut q);
            names(&tree.list(&q).unwrap())
        };
        assert_eq!(q(|q| q.active = true), ["a", "b"]);
        assert_eq!(q(|q| q.inactive = true), ["d"]);
        assert_eq!(q(|q| q.disk_only = true), ["c"]);
        assert_eq!(
            q(|q| {
                q.disk_only = true;
                q.inactive = true;
            }),
            ["c", "d"]
        );
        assert_eq!(q(|q| q.internal = true), ["a", "c", "d"]);
        assert_eq!(q(|q| q.external = true), ["b"]);
        assert_eq!(
            q(|q| {
                q.external = true;
                q.internal = true;
            })
            .len(),
            4
        );
        assert_eq!(
            q(|q| {
                q.active = true;
                q.internal = true;
            }),
            ["a"]
        );
    }

    #[test]
    fn invalid_trees_are_errors() {
        let dup = SnapshotTree::new(vec![
            internal_meta("a", None, 1),
            internal_meta("a", None, 2),
        ]);
        assert_eq!(
            dup.unwrap_err().kind(),
            SnapshotMetaErrorKind::AlreadyExists
        );

        let orphan = SnapshotTree::new(vec![internal_meta("a", Some("zz"), 1)]).unwrap_err();
        assert_eq!(
            orphan.to_string(),
            "invalid argument: parent zz for moment a not found"
        );

        let cyc = SnapshotTree::new(vec![
            internal_meta("r", None, 0),
            internal_meta("a", Some("c"), 1),
            internal_meta("b", Some("a"), 2),
            internal_meta("c", Some("b"), 3),
        ])
        .unwrap_err();
        assert_eq!(cyc.kind(), SnapshotMetaErrorKind::Corrupt);
        let msg = cyc.to_string();
        for n in ["a", "b", "c"] {
            assert!(msg.contains(n), "{msg}");
        }

        let mut x = internal_meta("x", None, 1);
        let mut y = internal_meta("y", None, 1);
        x.is_current = true;
        y.is_current = true;
        assert_eq!(
            SnapshotTree::new(vec![x, y]).unwrap_err().kind(),
            SnapshotMetaErrorKind::Corrupt
        );
    }

    #[test]
    fn create_refuses_duplicates_and_wrong_parent() {
        let mut tree = fan_out();
        let err = tree
            .insert_created(internal_meta("s1", Some("s8"), 5))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "operation failed: domain moment s1 already exists"
        );
        let err = tree
            .insert_created(internal_meta("s9", Some("s1"), 5))
            .unwrap_err();
        assert!(err.to_string().contains("current snapshot is s8"), "{err}");
        assert_eq!(tree.current().unwrap().name, "s8");
    }

    #[test]
    fn redefine_needs_parent_first() {
        let mut tree = SnapshotTree::default();
        let err = tree
            .insert_redefined(internal_meta("s2", Some("s3"), 2), true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument: parent s3 for moment s2 not found"
        );
        tree.insert_redefined(internal_meta("s3", None, 1), false)
            .unwrap();
        assert!(tree.current().is_none());
        tree.insert_redefined(internal_meta("s2", Some("s3"), 2), true)
            .unwrap();
        assert_eq!(tree.current().unwrap().name, "s2");
    }

    /// The delete sequence of virsh's tests/virsh-snapshot after the fan-out.
    #[test]
    fn deletes_follow_virsh_test_sequence() {
        let mut tree = fan_out();
        tree.set_current("s1").unwrap();
        // Deleting the current root: children become roots, no current.
        let plan = tree.plan_delete("s1", DeleteScope::Node, false).unwrap();
        assert_eq!(plan.removed, ["s1"]);
        assert_eq!(
            plan.reparented,
            [
                Reparent {
                    child: "s3".into(),
                    new_parent: None
                },
                Reparent {
                    child: "s7".into(),
                    new_parent: None
                },
            ]
        );
        assert_eq!(plan.current_before.as_deref(), Some("s1"));
        assert_eq!(plan.current_after, None);
        tree.apply_delete(&plan).unwrap();
        assert!(tree.current().is_none());
        assert_eq!(names(&tree.roots()), ["s3", "s7"]);
        let mut q = ListQuery {
            no_leaves: true,
            ..Default::default()
        };
        assert_eq!(names(&tree.list(&q).unwrap()), ["s3", "s6", "s7"]);
        q = ListQuery {
            from: Some("s3".into()),
            ..Default::default()
        };
        assert_eq!(names(&tree.list(&q).unwrap()), ["s2", "s6"]);

        // --children-only s6 with s4 current: current moves to s6.
        tree.set_current("s4").unwrap();
        let plan = tree
            .plan_delete("s6", DeleteScope::ChildrenOnly, false)
            .unwrap();
        assert_eq!(plan.removed, ["s5", "s4"]);
        assert!(plan.reparented.is_empty());
        assert_eq!(plan.current_after.as_deref(), Some("s6"));
        tree.apply_delete(&plan).unwrap();
        assert_eq!(tree.current().unwrap().name, "s6");

        // --children s7: current (s6) is elsewhere and stays.
        let plan = tree
            .plan_delete("s7", DeleteScope::WithChildren, false)
            .unwrap();
        assert_eq!(plan.removed, ["s8", "s7"]);
        assert_eq!(plan.current_after.as_deref(), Some("s6"));
        tree.apply_delete(&plan).unwrap();

        // Plain delete of the current s6: current moves to its parent s3.
        let plan = tree.plan_delete("s6", DeleteScope::Node, false).unwrap();
        assert_eq!(plan.current_after.as_deref(), Some("s3"));
        tree.apply_delete(&plan).unwrap();
        assert_eq!(tree.current().unwrap().name, "s3");
        let all = ListQuery::default();
        assert_eq!(names(&tree.list(&all).unwrap()), ["s2", "s3"]);
        let topo = ListQuery {
            topological: true,
            ..Default::default()
        };
        assert_eq!(names(&tree.list(&topo).unwrap()), ["s3", "s2"]);
    }

    #[test]
    fn delete_reparents_inner_node_children_and_moves_deep_current() {
        let mut tree = fan_out();
        // s8 current; delete s1 with children: everything goes, no current.
        let plan = tree
            .plan_delete("s1", DeleteScope::WithChildren, true)
            .unwrap();
        assert!(plan.metadata_only);
        assert_eq!(plan.removed.len(), 8);
        let pos = |n: &str| plan.removed.iter().position(|r| r == n).unwrap();
        for (child, parent) in [
            ("s2", "s3"),
            ("s4", "s6"),
            ("s5", "s6"),
            ("s6", "s3"),
            ("s3", "s1"),
            ("s8", "s7"),
            ("s7", "s1"),
        ] {
            assert!(pos(child) < pos(parent), "{child} before {parent}");
        }
        assert_eq!(plan.current_after, None);

        // Inner plain delete of s3: s2 and s6 move up to s1.
        let plan = tree.plan_delete("s3", DeleteScope::Node, false).unwrap();
        assert_eq!(plan.removed, ["s3"]);
        assert_eq!(
            plan.reparented,
            [
                Reparent {
                    child: "s2".into(),
                    new_parent: Some("s1".into())
                },
                Reparent {
                    child: "s6".into(),
                    new_parent: Some("s1".into())
                },
            ]
        );
        assert_eq!(plan.current_after.as_deref(), Some("s8"));
        tree.apply_delete(&plan).unwrap();
        assert_eq!(names(&tree.children("s1").unwrap()), ["s2", "s6", "s7"]);

        // --children of s6 while its grandchild s4 is current: current -> s1.
        tree.set_current("s4").unwrap();
        let plan = tree
            .plan_delete("s6", DeleteScope::WithChildren, false)
            .unwrap();
        assert_eq!(plan.current_after.as_deref(), Some("s1"));
        tree.apply_delete(&plan).unwrap();
        assert_eq!(tree.current().unwrap().name, "s1");
        assert!(tree.plan_delete("s6", DeleteScope::Node, false).is_err());
    }

    #[test]
    fn tree_entries_from_a_node() {
        let tree = fan_out();
        let entries = tree.tree_entries(Some("s6")).unwrap();
        assert_eq!(
            entries,
            [
                TreeEntry {
                    name: "s4".into(),
                    parent: Some("s6".into())
                },
                TreeEntry {
                    name: "s5".into(),
                    parent: Some("s6".into())
                },
                TreeEntry {
                    name: "s6".into(),
                    parent: None
                },
            ]
        );
    }

    #[test]
    fn option_exclusions_use_virsh_messages() {
        let out = ListOutputOptions {
            tree: true,
            name: true,
            ..Default::default()
        };
        assert_eq!(
            ListQuery::default()
                .check_options(out)
                .unwrap_err()
                .to_string(),
            "Options --tree and --name are mutually exclusive"
        );
        let tree = ListOutputOptions {
            tree: true,
            ..Default::default()
        };
        let q = ListQuery {
            leaves: true,
            ..Default::default()
        };
        assert_eq!(
            q.check_options(tree).unwrap_err().to_string(),
            "--leaves and --tree are mutually exclusive"
        );
        let q = ListQuery {
            descendants: true,
            ..Default::default()
        };
        assert_eq!(
            q.check_options(ListOutputOptions::default())
                .unwrap_err()
                .to_string(),
            "--descendants requires either --from or --current"
        );
        let q = ListQuery {
            roots: true,
            from: Some("s1".into()),
            ..Default::default()
        };
        assert!(q.check_options(ListOutputOptions::default()).is_err());
        let q = ListQuery {
            from: Some("s1".into()),
            descendants: true,
            ..Default::default()
        };
        q.check_options(tree).unwrap();
    }

    #[test]
    fn resolve_follows_virsh_lookup() {
        let mut tree = fan_out();
        assert_eq!(
            tree.resolve(Some("s3"), false, "snapshotname")
                .unwrap()
                .name,
            "s3"
        );
        assert_eq!(tree.resolve(None, true, "snapshotname").unwrap().name, "s8");
        assert_eq!(
            tree.resolve(Some("s3"), true, "from")
                .unwrap_err()
                .to_string(),
            "--from and --current are mutually exclusive"
        );
        assert_eq!(
            tree.resolve(None, false, "snapshotname")
                .unwrap_err()
                .to_string(),
            "--snapshotname or --current is required"
        );
        assert_eq!(tree.current_name("test").unwrap(), "s8");
        assert_eq!(tree.parent_name("s8").unwrap(), "s7");
        assert_eq!(
            tree.parent_name("s1").unwrap_err().to_string(),
            "snapshot 's1' has no parent"
        );
        let plan = tree
            .plan_delete("s1", DeleteScope::WithChildren, false)
            .unwrap();
        tree.apply_delete(&plan).unwrap();
        assert!(tree.is_empty());
        assert_eq!(
            tree.resolve(None, true, "snapshotname")
                .unwrap_err()
                .to_string(),
            "Domain snapshot not found: the domain does not have a current snapshot"
        );
        assert_eq!(
            tree.current_name("test").unwrap_err().to_string(),
            "domain 'test' has no current snapshot"
        );
    }

    #[test]
    fn summary_serializes_tree_facts() {
        let tree = fan_out();
        let json = serde_json::to_value(tree.summary("s3").unwrap()).unwrap();
        assert_eq!(json["name"], "s3");
        assert_eq!(json["parent"], "s1");
        assert_eq!(json["kind"], "internal");
        assert_eq!(json["location"], "internal");
        assert_eq!(json["state"], "running");
        assert_eq!(json["current"], false);
        assert_eq!(json["children"], 2);
        assert_eq!(json["descendants"], 4);
        assert_eq!(json["memory"]["vmstate_disk"], "vda");
        assert_eq!(json["disks"][0]["target"], "vda");
        assert!(tree.summary("zz").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create,
        Revert(usize),
        Delete(usize, u8, bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Op::Create),
            1 => any::<usize>().prop_map(Op::Revert),
            1 => (any::<usize>(), 0u8..3, any::<bool>()).prop_map(|(i, s, m)| Op::Delete(i, s, m)),
        ]
    }

    /// A naive model of libvirt's tree rules: parent map plus current.
    #[derive(Default)]
    struct Model {
        parent: BTreeMap<String, Option<String>>,
        current: Option<String>,
    }

    impl Model {
        fn descendants(&self, n: &str) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            loop {
                let before = out.len();
                for (c, p) in &self.parent {
                    if let Some(p) = p {
                        if p == n || out.contains(p) {
                            out.insert(c.clone());
                        }
                    }
                }
                if out.len() == before {
                    return out;
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn random_histories_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut tree = SnapshotTree::default();
            let mut model = Model::default();
            let mut next = 0;
            for op in ops {
                let existing: Vec<String> = model.parent.keys().cloned().collect();
                match op {
                    Op::Create => {
                        next += 1;
                        let name = format!("n{next}");
                        let meta = internal_meta(&name, model.current.as_deref(), next);
                        tree.insert_created(meta).unwrap();
                        model.parent.insert(name.clone(), model.current.clone());
                        model.current = Some(name);
                    }
                    Op::Revert(i) if !existing.is_empty() => {
                        let n = &existing[i % existing.len()];
                        tree.set_current(n).unwrap();
                        model.current = Some(n.clone());
                    }
                    Op::Delete(i, scope, meta_only) if !existing.is_empty() => {
                        let n = existing[i % existing.len()].clone();
                        let scope = [DeleteScope::Node, DeleteScope::WithChildren, DeleteScope::ChildrenOnly][scope as usize];
                        let plan = tree.plan_delete(&n, scope, meta_only).unwrap();
                        let desc = model.descendants(&n);
                        let n_parent = model.parent[&n].clone();
                        let removed: BTreeSet<String> = match scope {
                            DeleteScope::Node => [n.clone()].into(),
                            DeleteScope::WithChildren => desc.iter().cloned().chain([n.clone()]).collect(),
                            DeleteScope::ChildrenOnly => desc.clone(),
                        };
                        proptest::prop_assert_eq!(plan.removed.iter().cloned().collect::<BTreeSet<_>>(), removed.clone());
                        // Children before parents in the removal order.
                        for (i, r) in plan.removed.iter().enumerate() {
                            for later in &plan.removed[i + 1..] {
                                proptest::prop_assert!(!model.descendants(r).contains(later), "{} removed before its descendant {}", r, later);
                            }
                        }
                        if let Some(cur) = model.current.clone() {
                            if removed.contains(&cur) {
                                model.current = match scope {
                                    DeleteScope::ChildrenOnly => Some(n.clone()),
                                    _ => n_parent.clone(),
                                };
                            }
                        }
                        if scope == DeleteScope::Node {
                            for p in model.parent.values_mut() {
                                if p.as_deref() == Some(n.as_str()) {
                                    *p = n_parent.clone();
                                }
                            }
                        }
                        for r in &removed {
                            model.parent.remove(r);
                        }
                        tree.apply_delete(&plan).unwrap();
                    }
                    _ => {}
                }
                let got: BTreeMap<String, Option<String>> =
                    tree.metas().map(|m| (m.name.clone(), m.parent.clone())).collect();
                proptest::prop_assert_eq!(&got, &model.parent);
                proptest::prop_assert_eq!(tree.current().map(|m| m.name.clone()), model.current.clone());
                let topo = names(&tree.topological());
                proptest::prop_assert_eq!(topo.len(), tree.len());
                for (i, n) in topo.iter().enumerate() {
                    if let Some(p) = &model.parent[n] {
                        proptest::prop_assert!(topo[..i].contains(p), "{} listed before its parent {}", n, p);
                    }
                }
            }
        }
    }

    #[test]
    fn name_order_is_case_insensitive_like_virsh() {
        let mut v = vec!["b", "A", "a", "B", "s10", "s2"];
        v.sort_by(|a, b| name_order(a, b));
        assert_eq!(v, ["A", "a", "B", "b", "s10", "s2"]);
    }
}
