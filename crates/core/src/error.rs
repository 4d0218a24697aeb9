//! The one error type of the core library.
//!
//! Every message names the object that failed (domain, file, key) and, where
//! the user can do something about it, what to do. Callers branch on
//! [`Error::kind`] rather than on message text.

use std::io;
use std::path::{Path, PathBuf};

/// A category of failure, stable across message wording, so callers (the CLI,
/// the snapshot code, scripts reading exit paths) can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named domain (or other object) does not exist.
    NotFound,
    /// The object to create exists already.
    AlreadyExists,
    /// Another vmsnap process holds the domain's lock.
    Busy,
    /// A domain config file is malformed or refers to unusable files.
    InvalidConfig,
    /// The domain is in the wrong state for the request (e.g. start while running).
    InvalidState,
    /// QEMU refused to start or misbehaved as a process.
    Qemu,
    /// A QMP conversation failed: QEMU rejected a command or the monitor broke.
    Qmp,
    /// A filesystem or process operation failed.
    Io,
    /// The metadata store could not be read or written.
    Store,
}

/// Everything that can go wrong in the core library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No domain of this name is defined in the state directory.
    #[error("domain '{name}' not found: run `vmsnap list --all` to see the defined domains")]
    DomainNotFound {
        /// The name asked for.
        name: String,
    },

    /// `define` for a name that is already taken.
    #[error("domain '{name}' is already defined: undefine it first or pick another name")]
    DomainExists {
        /// The clashing name.
        name: String,
    },

    /// Another vmsnap process holds the per-domain lock.
    #[error("domain {name} is busy: another vmsnap command ({holder}) is working on it; retry or pass --wait")]
    Busy {
        /// The locked domain.
        name: String,
        /// "pid N", or "pid unknown" if the holder has not written its pid yet.
        holder: String,
    },

    /// A config file failed to parse or validate.
    #[error("invalid domain config {}{}: {reason}", file.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    InvalidConfig {
        /// The config file (or a description of its origin).
        file: PathBuf,
        /// 1-based line of the offending key or value, where known.
        line: Option<usize>,
        /// What is wrong and, where useful, what is allowed.
        reason: String,
    },

    /// The domain is not in a state that allows the request.
    #[error("cannot {action} domain '{name}': it is {state}{}", if hint.is_empty() { String::new() } else { format!("; {hint}") })]
    InvalidState {
        /// The domain.
        name: String,
        /// What was asked ("start", "suspend", ...).
        action: String,
        /// Its current state as `list` shows it.
        state: String,
        /// What the user can do instead (may be empty).
        hint: String,
    },

    /// QEMU could not be started or did not behave as a process should.
    #[error("QEMU for domain '{name}' {what}")]
    Qemu {
        /// The domain.
        name: String,
        /// What went wrong, including QEMU's own stderr on one line where there is one.
        what: String,
    },

    /// A QMP conversation with the domain's QEMU failed; the source says
    /// which command and, when QEMU refused it, QEMU's error class and text.
    #[error("domain '{name}': {source}")]
    Qmp {
        /// The domain.
        name: String,
        /// The QMP client's error.
        #[source]
        source: vmsnap_qmp::Error,
    },

    /// A filesystem or process operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create state directory", "read pid file", ...).
        action: String,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The state directory cannot be determined or used.
    #[error("state directory: {reason}")]
    StateDir {
        /// Why, and how to point vmsnap elsewhere.
        reason: String,
    },

    /// The SQLite metadata store failed.
    #[error("metadata store {}: {what}: {source}", path.display())]
    Store {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },

    /// The metadata store holds something vmsnap cannot interpret (hand edits,
    /// a newer vmsnap's schema).
    #[error("metadata store {}: {reason}", path.display())]
    StoreContent {
        /// The database file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl Error {
    /// The category of this error, for callers that react to failures.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::DomainNotFound { .. } => ErrorKind::NotFound,
            Error::DomainExists { .. } => ErrorKind::AlreadyExists,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::InvalidConfig { .. } => ErrorKind::InvalidConfig,
            Error::InvalidState { .. } => ErrorKind::InvalidState,
            Error::Qemu { .. } => ErrorKind::Qemu,
            Error::Qmp { .. } => ErrorKind::Qmp,
            Error::Io { .. } | Error::StateDir { .. } => ErrorKind::Io,
            Error::Store { .. } | Error::StoreContent { .. } => ErrorKind::Store,
        }
    }

    /// Builds an [`Error::Io`]; a helper because almost every I/O call site needs one.
    pub fn io(action: impl Into<String>, path: impl AsRef<Path>, source: io::Error) -> Error {
        Error::Io {
            action: action.into(),
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// The core library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
