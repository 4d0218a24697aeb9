//! The one error type of the test guest driver.
//!
//! Messages name the control socket (or image, or QEMU run directory) and say
//! what to try, because they end up in failing integration test output.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong, coarse enough for a test to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No answer (or no connection, or no ready guest) within the allowed time.
    Timeout,
    /// The control connection closed (QEMU exited or dropped the client).
    Disconnected,
    /// The guest understood the request and refused it.
    GuestRejected,
    /// The guest sent a reply this driver cannot parse.
    Protocol,
    /// An argument cannot be sent to the guest (bad disk name, unaligned range...).
    InvalidArgument,
    /// guest/out has not been built.
    GuestNotBuilt,
    /// QEMU could not be started, or exited when it should be running.
    Qemu,
    /// A host I/O error on the socket or a file.
    Io,
}

/// Errors of the test guest driver and the QEMU helper.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest did not answer a ping within the time allowed: it is still
    /// booting, paused, or the socket is not the guest's control channel.
    /// Look at the console log of the VM.
    #[error("test guest at {path} did not become ready within {waited:?} (is the VM running? see its console log)")]
    NotReady {
        /// The control socket.
        path: PathBuf,
        /// How long the driver tried.
        waited: Duration,
    },

    /// A request got no reply in time; the guest may be hung or paused.
    #[error("test guest at {path} did not answer `{request}` within {waited:?}")]
    Timeout {
        /// The control socket.
        path: PathBuf,
        /// The request line (without its id).
        request: String,
        /// How long the driver waited.
        waited: Duration,
    },

    /// The control connection was closed by QEMU while a request was open;
    /// reconnect (after a revert, to the new QEMU's socket).
    #[error("control connection {path} closed while waiting for `{request}`; reconnect with Guest::reconnect")]
    Disconnected {
        /// The control socket.
        path: PathBuf,
        /// The request that was pending.
        request: String,
    },

    /// The guest refused a request; its message says why.
    #[error("test guest at {path} refused `{request}`: {message}")]
    GuestRejected {
        /// The control socket.
        path: PathBuf,
        /// The request line (without its id).
        request: String,
        /// The guest's reason.
        message: String,
    },

    /// The guest answered with something that is not a valid reply to the request.
    #[error("test guest at {path} sent an unexpected reply to `{request}`: {reply:?}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// The request line (without its id).
        request: String,
        /// The reply payload as received.
        reply: String,
    },

    /// The caller passed something the protocol cannot carry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// guest/out/vmlinuz or initrd.img is missing.
    #[error("test guest file {path} is missing: run scripts/setup.sh (or guest/build.sh as root)")]
    GuestNotBuilt {
        /// The missing file.
        path: PathBuf,
    },

    /// qemu-system-x86_64 could not be spawned.
    #[error("cannot start qemu-system-x86_64 in {dir}: {source} (is QEMU installed? run scripts/setup.sh)")]
    QemuSpawn {
        /// The run directory of the VM.
        dir: PathBuf,
        /// Why spawning failed.
        source: io::Error,
    },

    /// QEMU exited while it should be running; its stderr says why.
    #[error("QEMU in {dir} exited ({status}): {stderr}")]
    QemuExited {
        /// The run directory of the VM.
        dir: PathBuf,
        /// The exit status as text.
        status: String,
        /// The end of QEMU's stderr.
        stderr: String,
    },

    /// QEMU did not create its sockets in time.
    #[error("QEMU in {dir} did not create {path} within {waited:?}")]
    QemuStartTimeout {
        /// The run directory of the VM.
        dir: PathBuf,
        /// The socket that never appeared.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },

    /// A host-side I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("connect to", "write to", "read"...).
        op: &'static str,
        /// The file or socket.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotReady { .. } | Error::Timeout { .. } | Error::QemuStartTimeout { .. } => {
                ErrorKind::Timeout
            }
            Error::Disconnected { .. } => ErrorKind::Disconnected,
            Error::GuestRejected { .. } => ErrorKind::GuestRejected,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::GuestNotBuilt { .. } => ErrorKind::GuestNotBuilt,
            Error::QemuSpawn { .. } | Error::QemuExited { .. } => ErrorKind::Qemu,
            Error::Io { .. } => ErrorKind::Io,
        }
    }
}
