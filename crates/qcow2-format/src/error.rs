//! Why a structure could not be decoded or encoded.

/// A structure on disk is malformed, unsupported or would not fit.
///
/// The engine wraps these with the image path, so messages here name only the
/// structure and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The structure is shorter than its fixed part or than a length it declares.
    #[error("{what} is truncated (need {needed} bytes, have {available})")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// A field holds a value the format forbids or QEMU refuses.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A valid image uses a feature this implementation does not handle.
    #[error("unsupported {feature}")]
    Unsupported {
        /// The feature and its value.
        feature: String,
    },
    /// An encoded structure would not fit where it has to go.
    #[error("{what} does not fit: {detail}")]
    TooLarge {
        /// Which structure.
        what: &'static str,
        /// Sizes involved.
        detail: String,
    },
}

impl FormatError {
    pub(crate) fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Invalid {
            field,
            detail: detail.into(),
        }
    }

    pub(crate) fn truncated(what: &'static str, needed: u64, available: usize) -> Self {
        FormatError::Truncated {
            what,
            needed,
            available: available as u64,
        }
    }
}
