//! Errors of the pure snapshot-metadata layer: names, trees, XML and xl
//! snapshot configs. Orchestration errors (QMP, images) live elsewhere.

use thiserror::Error;

/// What went wrong with snapshot metadata, in words a user can act on.
///
/// Messages that virsh also prints are worded exactly as virsh 9.0 words
/// them, so scripts matching on virsh's stderr keep working.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotMetaError {
    /// A snapshot name breaks the naming rules (empty, '/', leading '.', ...).
    #[error("invalid snapshot name '{name}': {reason}")]
    InvalidName {
        /// The refused name, as given.
        name: String,
        /// Which rule it breaks and what to do instead.
        reason: String,
    },
    /// No snapshot of that name exists (virsh's wording).
    #[error("Domain snapshot not found: no domain snapshot with matching name '{name}'")]
    NotFound {
        /// The name that was looked up.
        name: String,
    },
    /// A snapshot of that name already exists (virsh's wording).
    #[error("operation failed: domain moment {name} already exists")]
    Duplicate {
        /// The name that is taken.
        name: String,
    },
    /// A snapshot names a parent that is not in the tree.
    #[error("invalid argument: parent {parent} for moment {name} not found")]
    MissingParent {
        /// The snapshot whose parent is missing.
        name: String,
        /// The missing parent's name.
        parent: String,
    },
    /// Parent links loop back on themselves.
    #[error("snapshot metadata is corrupt: parent links form a cycle through {names}; fix or redefine these snapshots")]
    Cycle {
        /// The snapshots on the cycle, comma separated.
        names: String,
    },
    /// More than one snapshot claims to be current.
    #[error("snapshot metadata is corrupt: both {first} and {second} are marked current; set one with snapshot-current")]
    SeveralCurrent {
        /// One of the snapshots marked current.
        first: String,
        /// Another snapshot marked current.
        second: String,
    },
    /// The domain has no current snapshot but one was needed.
    #[error("domain '{domain}' has no current snapshot")]
    NoCurrent {
        /// The domain asked about.
        domain: String,
    },
    /// `--current` was given but no snapshot is current (libvirt's wording).
    #[error("Domain snapshot not found: the domain does not have a current snapshot")]
    CurrentNotSet,
    /// A snapshot has no parent but one was asked for (virsh's wording).
    #[error("snapshot '{name}' has no parent")]
    NoParent {
        /// The root snapshot asked about.
        name: String,
    },
    /// A snapshot record contradicts itself (e.g. external memory with internal disks).
    #[error("snapshot {name} is inconsistent: {reason}")]
    Inconsistent {
        /// The snapshot concerned.
        name: String,
        /// What contradicts what.
        reason: String,
    },
    /// Command-line options that cannot be combined (virsh's wording).
    #[error("{0}")]
    BadOptions(String),
    /// Domain snapshot XML that is malformed or uses values we do not know.
    #[error("invalid domain snapshot XML: {0}")]
    Xml(String),
    /// An xl snapshot config with a syntax or value error, with its line and key.
    #[error("xl snapshot config line {line}{}: {reason}", key.as_deref().map(|k| format!(", key '{k}'")).unwrap_or_default())]
    XlConfig {
        /// 1-based line of the offending text.
        line: usize,
        /// The key being parsed, if the error belongs to one.
        key: Option<String>,
        /// What is wrong and what is expected instead.
        reason: String,
    },
    /// Stored snapshot metadata (JSON) could not be read back.
    #[error("stored snapshot metadata for {name} is unreadable: {reason}")]
    Corrupt {
        /// The snapshot whose record failed to parse.
        name: String,
        /// The parser's complaint.
        reason: String,
    },
}

/// The kinds of [`SnapshotMetaError`], for callers that branch on the cause
/// (exit codes, retries, which message to add).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotMetaErrorKind {
    /// Bad user input: names, options, XML or xl config.
    InvalidInput,
    /// The named snapshot (or its current/parent) does not exist.
    NotFound,
    /// The name is already taken.
    AlreadyExists,
    /// Stored metadata contradicts itself and needs repair.
    Corrupt,
}

impl SnapshotMetaError {
    /// The broad cause, for branching without matching every variant.
    pub fn kind(&self) -> SnapshotMetaErrorKind {
        match self {
            Self::InvalidName { .. }
            | Self::BadOptions(_)
            | Self::Xml(_)
            | Self::XlConfig { .. } => SnapshotMetaErrorKind::InvalidInput,
            Self::NotFound { .. }
            | Self::NoCurrent { .. }
            | Self::CurrentNotSet
            | Self::NoParent { .. } => SnapshotMetaErrorKind::NotFound,
            Self::MissingParent { .. } | Self::Inconsistent { .. } => {
                SnapshotMetaErrorKind::InvalidInput
            }
            Self::Duplicate { .. } => SnapshotMetaErrorKind::AlreadyExists,
            Self::Cycle { .. } | Self::SeveralCurrent { .. } | Self::Corrupt { .. } => {
                SnapshotMetaErrorKind::Corrupt
            }
        }
    }
}
