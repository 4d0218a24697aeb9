//! The snapshot record: everything needed to list, revert and delete one
//! snapshot later, kept by the store as JSON.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::SnapshotMetaError;
use super::name::validate_snapshot_name;

/// The domain state a snapshot captured, with virsh's words for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// Taken with memory from a running guest; revert resumes it.
    Running,
    /// Taken with memory from a paused guest; revert leaves it paused.
    Paused,
    /// Taken from a stopped domain: disks only, revert leaves it stopped.
    Shutoff,
    /// Disk-only snapshot of a running guest (no memory captured).
    DiskSnapshot,
}

impl SnapshotState {
    /// The word virsh prints in `snapshot-list` and `<state>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutoff => "shutoff",
            Self::DiskSnapshot => "disk-snapshot",
        }
    }

    /// Parses virsh's word; `None` for anything else.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "running" => Some(Self::Running),
            "paused" => Some(Self::Paused),
            "shutoff" => Some(Self::Shutoff),
            "disk-snapshot" => Some(Self::DiskSnapshot),
            _ => None,
        }
    }

    /// Whether virsh's `--active` filter keeps it: a full system snapshot
    /// (memory included) of a running or paused guest.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a snapshot keeps the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum MemorySnapshot {
    /// No memory captured (disk-only or stopped domain).
    None,
    /// vmstate inside one qcow2 image (QMP `snapshot-save`).
    Internal {
        /// Target of the disk (e.g. `vda`) whose image holds the vmstate.
        vmstate_disk: String,
    },
    /// A migration stream in a file of its own.
    External {
        /// Absolute path of the memory file.
        path: PathBuf,
    },
}

/// How one disk takes part in a snapshot (libvirt's `snapshot=` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSnapshotMode {
    /// A qcow2 internal snapshot inside the disk's image.
    Internal,
    /// The image is frozen and a new overlay becomes the active layer.
    External,
    /// The disk is left out of the snapshot.
    No,
}

impl DiskSnapshotMode {
    /// libvirt's word for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::External => "external",
            Self::No => "no",
        }
    }

    /// Parses libvirt's word; `None` for anything else.
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "internal" => Some(Self::Internal),
            "external" => Some(Self::External),
            "no" => Some(Self::No),
            _ => None,
        }
    }
}

/// One disk's part in a snapshot: what to revert to and what to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshotRecord {
    /// Guest-visible target, e.g. `vda`.
    pub target: String,
    /// Internal, external or left out.
    pub mode: DiskSnapshotMode,
    /// The image the snapshot refers to: for internal, the qcow2 holding
    /// the snapshot; for external, the image frozen under the overlay; for
    /// `no`, the disk's image at the time.
    pub source: PathBuf,
    /// Format of `source` (`qcow2` or `raw`), never guessed.
    pub source_format: String,
    /// External only: the overlay created on top of `source` (the active
    /// layer right after the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
    /// External only: format of `overlay` (always `qcow2` for overlays we make).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_format: Option<String>,
}

/// The four kinds a user chooses between (DESIGN §4), derived from where
/// memory and disks went so a record can never contradict its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// Memory (if running) and disks inside the qcow2 images.
    Internal,
    /// Memory file and overlays outside the original images.
    External,
    /// Disks only, as qcow2 internal snapshots.
    DiskOnlyInternal,
    /// Disks only, frozen under overlays.
    DiskOnlyExternal,
}

impl SnapshotKind {
    /// A short word for tables and `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::External => "external",
            Self::DiskOnlyInternal => "disk-only-internal",
            Self::DiskOnlyExternal => "disk-only-external",
        }
    }
}

/// Everything recorded about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Unique within its domain; see [`validate_snapshot_name`].
    pub name: String,
    /// The domain the snapshot belongs to.
    pub domain: String,
    /// Free text from the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The snapshot this one was taken on top of (the current snapshot
    /// at creation time), `None` for a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub creation_time: i64,
    /// Domain state captured.
    pub state: SnapshotState,
    /// Where memory went.
    pub memory: MemorySnapshot,
    /// Every disk of the domain at the time, including left-out ones.
    pub disks: Vec<DiskSnapshotRecord>,
    /// The domain config (TOML) at the time, restored on revert.
    pub domain_config: String,
    /// Whether this is the domain's current snapshot (the parent of the next one).
    #[serde(default)]
    pub is_current: bool,
}

impl SnapshotMeta {
    /// The kind, derived from the memory and disk records: memory decides
    /// full vs disk-only; the disks (or memory) decide internal vs external.
    pub fn kind(&self) -> SnapshotKind {
        let external = self.is_external();
        match (&self.memory, external) {
            (MemorySnapshot::None, false) => SnapshotKind::DiskOnlyInternal,
            (MemorySnapshot::None, true) => SnapshotKind::DiskOnlyExternal,
            (_, false) => SnapshotKind::Internal,
            (_, true) => SnapshotKind::External,
        }
    }

    /// libvirt's location rule (`virDomainSnapshotIsExternal`): external
    /// when the memory or any disk is external.
    pub fn is_external(&self) -> bool {
        matches!(self.memory, MemorySnapshot::External { .. })
            || self
                .disks
                .iter()
                .any(|d| d.mode == DiskSnapshotMode::External)
    }

    /// Whether the snapshot captured memory (`--disk-only` did not).
    pub fn has_memory(&self) -> bool {
        !matches!(self.memory, MemorySnapshot::None)
    }

    /// The record of one disk by target.
    pub fn disk(&self, target: &str) -> Option<&DiskSnapshotRecord> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// Checks that the record is one the orchestrator can revert: a valid
    /// name, state agreeing with memory, no internal/external mix, paths
    /// absolute, external disks with an overlay.
    pub fn validate(&self) -> Result<(), SnapshotMetaError> {
        validate_snapshot_name(&self.name)?;
        let bad = |reason: String| {
            Err(SnapshotMetaError::Inconsistent {
                name: self.name.clone(),
                reason,
            })
        };
        if let Some(parent) = &self.parent {
            if parent == &self.name {
                return bad("it names itself as its parent".into());
            }
        }
        match (&self.memory, self.state) {
            (MemorySnapshot::None, SnapshotState::Running | SnapshotState::Paused) => {
                return bad(format!(
                    "state {} needs a memory image but none is recorded",
                    self.state
                ))
            }
            (MemorySnapshot::Internal { .. } | MemorySnapshot::External { .. }, s)
                if !s.is_active() =>
            {
                return bad(format!("state {s} cannot have a memory image"))
            }
            _ => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for disk in &self.disks {
            if !seen.insert(disk.target.as_str()) {
                return bad(format!("disk {} is recorded twice", disk.target));
            }
            if !disk.source.is_absolute() {
                return bad(format!(
                    "disk {} has a relative image path {}",
                    disk.target,
                    disk.source.display()
                ));
            }
            match disk.mode {
                DiskSnapshotMode::External => match &disk.overlay {
                    None => return bad(format!("external disk {} has no overlay", disk.target)),
                    Some(o) if !o.is_absolute() => {
                        return bad(format!(
                            "disk {} has a relative overlay path {}",
                            disk.target,
                            o.display()
                        ))
                    }
                    Some(_) => {}
                },
                DiskSnapshotMode::Internal if disk.source_format != "qcow2" => {
                    return bad(format!(
                        "disk {} is {} and cannot hold an internal snapshot; use an external snapshot for it",
                        disk.target, disk.source_format
                    ))
                }
                _ => {}
            }
        }
        let internal_disks = self
            .disks
            .iter()
            .any(|d| d.mode == DiskSnapshotMode::Internal);
        let external_disks = self
            .disks
            .iter()
            .any(|d| d.mode == DiskSnapshotMode::External);
        match &self.memory {
            MemorySnapshot::Internal { vmstate_disk } => {
                if external_disks {
                    return bad("internal memory cannot go with external disks".into());
                }
                match self.disk(vmstate_disk) {
                    Some(d) if d.mode == DiskSnapshotMode::Internal => {}
                    _ => {
                        return bad(format!(
                            "the vmstate disk {vmstate_disk} is not an internally snapshotted disk"
                        ))
                    }
                }
            }
            MemorySnapshot::External { path } => {
                if !path.is_absolute() {
                    return bad(format!("relative memory file path {}", path.display()));
                }
            }
            MemorySnapshot::None => {}
        }
        if !internal_disks && !external_disks {
            return bad("no disk is snapshotted".into());
        }
        Ok(())
    }

    /// The JSON the store keeps.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("snapshot records hold only strings, numbers and paths")
    }

    /// Reads a record the store kept; `name` only labels the error.
    pub fn from_json(name: &str, json: &str) -> Result<Self, SnapshotMetaError> {
        serde_json::from_str(json).map_err(|e| SnapshotMetaError::Corrupt {
            name: name.to_string(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid internal record with memory, for tests across the module.
    pub(crate) fn internal_meta(name: &str, parent: Option<&str>, time: i64) -> SnapshotMeta {
        SnapshotMeta {
            name: name.into(),
            domain: "test".into(),
            description: None,
            parent: parent.map(Into::into),
            creation_time: time,
            state: SnapshotState::Running,
            memory: MemorySnapshot::Internal {
                vmstate_disk: "vda".into(),
            },
            disks: vec![DiskSnapshotRecord {
                target: "vda".into(),
                mode: DiskSnapshotMode::Internal,
                source: "/img/vda.qcow2".into(),
                source_format: "qcow2".into(),
                overlay: None,
                overlay_format: None,
            }],
            domain_config: "name = \"test\"\n".into(),
            is_current: false,
        }
    }

    /// A valid external record with a memory file and one raw disk.
    pub(crate) fn external_meta(name: &str, parent: Option<&str>, time: i64) -> SnapshotMeta {
        SnapshotMeta {
            memory: MemorySnapshot::External {
                path: format!("/state/test/{name}.mem").into(),
            },
            disks: vec![
                DiskSnapshotRecord {
                    target: "vda".into(),
                    mode: DiskSnapshotMode::External,
                    source: "/img/vda.raw".into(),
                    source_format: "raw".into(),
                    overlay: Some(format!("/state/test/vda.{name}.qcow2").into()),
                    overlay_format: Some("qcow2".into()),
                },
                DiskSnapshotRecord {
                    target: "vdb".into(),
                    mode: DiskSnapshotMode::No,
                    source: "/img/scratch.raw".into(),
                    source_format: "raw".into(),
                    overlay: None,
                    overlay_format: None,
                },
            ],
            ..internal_meta(name, parent, time)
        }
    }

    #[test]
    fn kind_follows_memory_and_disks() {
        let mut m = internal_meta("a", None, 1);
        assert_eq!(m.kind(), SnapshotKind::Internal);
        assert!(!m.is_external());
        m.memory = MemorySnapshot::None;
        m.state = SnapshotState::DiskSnapshot;
        assert_eq!(m.kind(), SnapshotKind::DiskOnlyInternal);
        let mut e = external_meta("b", None, 1);
        assert_eq!(e.kind(), SnapshotKind::External);
        e.memory = MemorySnapshot::None;
        e.state = SnapshotState::Shutoff;
        assert_eq!(e.kind(), SnapshotKind::DiskOnlyExternal);
        assert!(e.is_external());
    }

    #[test]
    fn valid_records_pass() {
        internal_meta("a", None, 1).validate().unwrap();
        external_meta("b", Some("a"), 1).validate().unwrap();
    }

    #[test]
    fn contradictions_are_refused() {
        let mut m = internal_meta("a", None, 1);
        m.state = SnapshotState::Shutoff;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("cannot have a memory"));

        let mut m = internal_meta("a", None, 1);
        m.memory = MemorySnapshot::None;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs a memory"));

        let mut m = internal_meta("a", None, 1);
        m.disks[0].source_format = "raw".into();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is raw and cannot hold"));

        let mut m = external_meta("a", None, 1);
        m.disks[0].overlay = None;
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("has no overlay"));

        // Internal disks beside external ones and a memory file are fine;
        // internal memory with an external disk is not.
        let mut m = external_meta("a", None, 1);
        m.disks.push(internal_meta("x", None, 1).disks[0].clone());
        m.disks[2].target = "vdc".into();
        m.validate().unwrap();
        assert!(m.is_external());
        m.memory = MemorySnapshot::Internal {
            vmstate_disk: "vdc".into(),
        };
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("internal memory cannot go with external disks"));

        let mut m = internal_meta("a", None, 1);
        m.memory = MemorySnapshot::Internal {
            vmstate_disk: "vdz".into(),
        };
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vmstate disk vdz"));

        let mut m = internal_meta("a", Some("a"), 1);
        assert!(m.validate().unwrap_err().to_string().contains("its parent"));
        m.parent = None;
        m.disks[0].mode = DiskSnapshotMode::No;
        m.memory = MemorySnapshot::None;
        m.state = SnapshotState::Shutoff;
        assert!(m.validate().unwrap_err().to_string().contains("no disk"));
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let mut e = external_meta("b", Some("a"), 1_700_000_000);
        e.description = Some("before \"upgrade\"".into());
        e.is_current = true;
        let json = e.to_json();
        assert!(json.contains("\"state\":\"running\""), "{json}");
        assert!(json.contains("\"type\":\"external\""), "{json}");
        assert_eq!(SnapshotMeta::from_json("b", &json).unwrap(), e);
        let err = SnapshotMeta::from_json("b", "{\"name\":1}").unwrap_err();
        assert!(err.to_string().contains("stored snapshot metadata for b"));
    }
}
