//! The one error type of the QMP client.
//!
//! Every variant names the QMP socket it happened on, and where it applies the
//! command, so that a message shown to a user says which VM and what to do.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::types::MigrationStatus;

/// What went wrong, coarse enough for a caller to branch on without matching
/// every field of [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// QEMU answered the command with an error (see [`Error::Qmp`]).
    Qmp,
    /// The connection is gone: QEMU exited, was killed, or `close` was called.
    Disconnected,
    /// No answer (or no awaited event) within the allowed time.
    Timeout,
    /// QEMU sent something that is not QMP as we know it.
    Protocol,
    /// The socket could not be connected to.
    Connect,
    /// Reading or writing the socket failed.
    Io,
    /// A reply could not be encoded or decoded as the expected type.
    Json,
    /// A background job concluded with an error.
    Job,
    /// No job with the awaited id exists.
    JobNotFound,
    /// A migration ended as failed or cancelled.
    Migration,
    /// An event subscriber fell behind and events were dropped for it.
    EventsLost,
}

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU refused the command; `class` is the QMP error class
    /// (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
    #[error("QEMU at {path} rejected `{command}`: {desc} ({class})")]
    Qmp {
        /// The QMP socket.
        path: PathBuf,
        /// The command QEMU refused.
        command: String,
        /// The QMP error class.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The QMP connection is closed; QEMU has probably exited. Check that the
    /// VM is still running (and its log), then connect again.
    #[error("QMP connection to {path} is closed (QEMU exited or the connection was closed)")]
    Disconnected {
        /// The QMP socket.
        path: PathBuf,
    },

    /// QEMU did not answer in time; the VM may be hung or overloaded.
    #[error("no answer from QEMU at {path} for `{command}` within {timeout:?}")]
    Timeout {
        /// The QMP socket.
        path: PathBuf,
        /// The command (or awaited condition) that timed out.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },

    /// QEMU sent something the QMP protocol does not allow at this point.
    #[error("unexpected QMP message from {path}: {detail}")]
    Protocol {
        /// The QMP socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// Connecting to the QMP socket failed (until the timeout ran out). Check
    /// that QEMU runs with `-qmp unix:PATH,server=on,wait=off`.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The QMP socket.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: io::Error,
    },

    /// Reading from or writing to the QMP socket failed.
    #[error("I/O error on QMP socket {path}: {source}")]
    Io {
        /// The QMP socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A command's arguments or its reply did not match the expected JSON shape.
    #[error("JSON error for `{command}` on {path}: {source}")]
    Json {
        /// The QMP socket.
        path: PathBuf,
        /// The command whose data did not fit.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// A QEMU job (snapshot-save, blockdev-create, ...) concluded with an error.
    #[error("QEMU job `{job_id}` on {path} failed: {error}")]
    Job {
        /// The QMP socket.
        path: PathBuf,
        /// The job id.
        job_id: String,
        /// The job's error as QEMU reported it in `query-jobs`.
        error: String,
    },

    /// The awaited job does not exist: it was never created or is already dismissed.
    #[error("QEMU at {path} has no job `{job_id}` (never created, or already dismissed)")]
    JobNotFound {
        /// The QMP socket.
        path: PathBuf,
        /// The job id.
        job_id: String,
    },

    /// A migration ended without completing.
    #[error("migration on {path} ended as {status}{}", desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Migration {
        /// The QMP socket.
        path: PathBuf,
        /// `failed` or `cancelled` (or another terminal status).
        status: MigrationStatus,
        /// QEMU's `error-desc`, when it gave one.
        desc: Option<String>,
    },

    /// An event receiver fell behind and `missed` events were dropped, so an
    /// awaited event may have been lost; subscribe again and re-check state.
    #[error("lost {missed} QMP events from {path}: the receiver fell behind")]
    EventsLost {
        /// The QMP socket.
        path: PathBuf,
        /// How many events were dropped.
        missed: u64,
    },
}

impl Error {
    /// The coarse kind of this error, for callers that branch on it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Qmp { .. } => ErrorKind::Qmp,
            Error::Disconnected { .. } => ErrorKind::Disconnected,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Connect { .. } => ErrorKind::Connect,
            Error::Io { .. } => ErrorKind::Io,
            Error::Json { .. } => ErrorKind::Json,
            Error::Job { .. } => ErrorKind::Job,
            Error::JobNotFound { .. } => ErrorKind::JobNotFound,
            Error::Migration { .. } => ErrorKind::Migration,
            Error::EventsLost { .. } => ErrorKind::EventsLost,
        }
    }

    /// The QMP error class when QEMU refused a command, so callers can treat
    /// e.g. `CommandNotFound` (older QEMU) differently from other refusals.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}
