//! Errors of snapshot orchestration: each says what failed, on which domain,
//! snapshot, image or file, and what to do.

use std::path::PathBuf;

/// Boxed lower-level error (QMP, qcow2 engine, domain layer) kept as a source.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure, for callers that branch (exit codes, retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A named domain, snapshot or disk does not exist.
    NotFound,
    /// A snapshot name or file that must be new already exists.
    AlreadyExists,
    /// The request is malformed (bad spec, bad XML, bad name).
    InvalidInput,
    /// The request is well formed but cannot be done for this VM (e.g. an
    /// internal snapshot of a raw disk).
    Unsupported,
    /// QEMU refused or failed a command.
    Qemu,
    /// An image could not be read, written or changed.
    Image,
    /// A file system operation failed.
    Io,
    /// The metadata store failed or holds unreadable records.
    Store,
    /// Something else holds the domain, or its state does not allow this.
    Conflict,
}

/// Everything snapshot orchestration can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The domain has no snapshot of that name.
    #[error("domain {domain} has no snapshot named '{name}': see `vmsnap snapshot-list {domain}`")]
    UnknownSnapshot {
        /// Domain name.
        domain: String,
        /// The missing snapshot.
        name: String,
    },
    /// A snapshot of that name exists already.
    #[error("domain {domain} already has a snapshot named '{name}': choose another name or delete it first")]
    DuplicateName {
        /// Domain name.
        domain: String,
        /// The taken name.
        name: String,
    },
    /// The domain has no current snapshot.
    #[error("domain {domain} has no current snapshot")]
    NoCurrent {
        /// Domain name.
        domain: String,
    },
    /// An internal snapshot was asked of a disk that is not qcow2.
    #[error("disk {disk} of domain {domain} is {format} ({file}): internal snapshots need qcow2; use --disk-only --diskspec {disk},snapshot=external or --external")]
    InternalNeedsQcow2 {
        /// Domain name.
        domain: String,
        /// Disk target.
        disk: String,
        /// The image's format.
        format: String,
        /// The image.
        file: PathBuf,
    },
    /// A file the snapshot would create exists already.
    #[error("{what} {path} already exists: vmsnap never overwrites a file; choose another path or remove it")]
    FileExists {
        /// What the file was for ("memory image", "overlay for vda").
        what: String,
        /// The file.
        path: PathBuf,
    },
    /// A file a snapshot needs has disappeared.
    #[error("snapshot '{snapshot}' of domain {domain} needs {path}, which is missing: the snapshot cannot be reverted; delete it with --metadata")]
    MissingFile {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        snapshot: String,
        /// The missing file.
        path: PathBuf,
    },
    /// The request does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// The request cannot be done for this VM.
    #[error("{0}")]
    Unsupported(String),
    /// A QMP command failed.
    #[error("QEMU of domain {domain} refused `{command}`: {source}")]
    Qemu {
        /// Domain name.
        domain: String,
        /// The QMP command.
        command: String,
        /// What QEMU (or the connection) said.
        #[source]
        source: Source,
    },
    /// QEMU could not be started for a revert.
    #[error("cannot start QEMU for domain {domain}: {detail}")]
    Launch {
        /// Domain name.
        domain: String,
        /// Why.
        detail: String,
    },
    /// The qcow2 engine failed on an image (its message names the image).
    #[error("{source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The engine's error.
        #[source]
        source: Source,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot create memory image").
        action: String,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The domain layer failed (unknown domain, lock held, store, QEMU start).
    #[error(transparent)]
    Core(#[from] crate::Error),
    /// A stored record cannot be decoded.
    #[error("stored {what} is unreadable: {source}")]
    CorruptRecord {
        /// Which record.
        what: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The domain is not in a state that allows the operation.
    #[error("{0}")]
    Conflict(String),
}

impl SnapshotError {
    /// The failure's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::UnknownSnapshot { .. } | SnapshotError::NoCurrent { .. } => {
                ErrorKind::NotFound
            }
            SnapshotError::MissingFile { .. } => ErrorKind::NotFound,
            SnapshotError::DuplicateName { .. } | SnapshotError::FileExists { .. } => {
                ErrorKind::AlreadyExists
            }
            SnapshotError::Invalid(_) => ErrorKind::InvalidInput,
            SnapshotError::InternalNeedsQcow2 { .. } | SnapshotError::Unsupported(_) => {
                ErrorKind::Unsupported
            }
            SnapshotError::Qemu { .. } | SnapshotError::Launch { .. } => ErrorKind::Qemu,
            SnapshotError::Image { .. } => ErrorKind::Image,
            SnapshotError::Io { .. } => ErrorKind::Io,
            SnapshotError::Core(err) => match err.kind() {
                crate::ErrorKind::NotFound => ErrorKind::NotFound,
                crate::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
                crate::ErrorKind::Busy | crate::ErrorKind::InvalidState => ErrorKind::Conflict,
                crate::ErrorKind::InvalidConfig => ErrorKind::InvalidInput,
                crate::ErrorKind::Qemu | crate::ErrorKind::Qmp => ErrorKind::Qemu,
                crate::ErrorKind::Io => ErrorKind::Io,
                crate::ErrorKind::Store => ErrorKind::Store,
            },
            SnapshotError::CorruptRecord { .. } => ErrorKind::Store,
            SnapshotError::Conflict(_) => ErrorKind::Conflict,
        }
    }
}

/// Result of orchestration calls.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
