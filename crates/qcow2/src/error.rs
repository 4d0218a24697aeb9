//! Errors of the qcow2 engine: one line each, naming the image and the problem.

use std::io;
use std::path::{Path, PathBuf};

use vmsnap_qcow2_format::FormatError;

/// What kind of failure happened, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image file or a snapshot does not exist.
    NotFound,
    /// Reading or writing the file failed.
    Io,
    /// The image's metadata is inconsistent or malformed.
    Corrupt,
    /// The image uses a feature this engine does not implement.
    Unsupported,
    /// The caller asked for something impossible (bad size, bad name, ...).
    InvalidArgument,
    /// The file system is full.
    NoSpace,
    /// Another process (usually QEMU) holds the image.
    Busy,
    /// The thing to create already exists (a snapshot name, an image file).
    AlreadyExists,
    /// A write was attempted on an image opened read-only.
    ReadOnly,
}

/// An engine failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the image file failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// What we were doing (e.g. "read the L1 table").
        op: String,
        /// The OS error.
        source: io::Error,
    },
    /// A structure could not be decoded; the image is malformed or unsupported.
    #[error("{path}: {source}")]
    Format {
        /// The image.
        path: PathBuf,
        /// What the decoder found.
        source: FormatError,
    },
    /// The metadata contradicts itself; run `vmsnap img check -r all` (or give up on the image).
    #[error("{path}: image is corrupt: {detail}")]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// What is inconsistent.
        detail: String,
    },
    /// A valid image needs a feature we do not implement.
    #[error("{path}: unsupported: {detail}")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// Which feature.
        detail: String,
    },
    /// The request itself is wrong.
    #[error("{path}: {detail}")]
    InvalidArgument {
        /// The image.
        path: PathBuf,
        /// What is wrong with the request.
        detail: String,
    },
    /// A snapshot (or other named object) does not exist in the image.
    #[error("{path}: {what} not found")]
    NotFound {
        /// The image.
        path: PathBuf,
        /// What was looked up, e.g. "snapshot 'base'".
        what: String,
    },
    /// A snapshot with this name or id already exists.
    #[error("{path}: {what} already exists")]
    AlreadyExists {
        /// The image.
        path: PathBuf,
        /// What exists, e.g. "snapshot 'base'".
        what: String,
    },
    /// The image is in use by another process.
    #[error(
        "{path}: image is in use by another process ({detail}); stop it or close the image first"
    )]
    Busy {
        /// The image.
        path: PathBuf,
        /// Which lock conflicted.
        detail: String,
    },
    /// A write on an image opened read-only.
    #[error("{path}: image is open read-only")]
    ReadOnly {
        /// The image.
        path: PathBuf,
    },
}

impl Error {
    /// The category of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
                Some(libc::ENOENT) => ErrorKind::NotFound,
                _ => ErrorKind::Io,
            },
            Error::Format { source, .. } => match source {
                FormatError::Unsupported { .. } => ErrorKind::Unsupported,
                _ => ErrorKind::Corrupt,
            },
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
        }
    }

    pub(crate) fn io(path: &Path, op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, source: FormatError) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(path: &Path, detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, Error>;
