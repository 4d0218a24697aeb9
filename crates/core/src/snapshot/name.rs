//! Snapshot name rules. Names become file names (external overlays and
//! memory files in the state directory) and qcow2 snapshot tags, so they
//! must be safe as a single path component.

use super::error::SnapshotMetaError;

/// Longest accepted name in bytes: a path component limit on Linux.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 255;

/// Refuses names that could not be used as a file name or that would be
/// confusing in listings; returns the reason in the error.
pub fn validate_snapshot_name(name: &str) -> Result<(), SnapshotMetaError> {
    let refuse = |reason: &str| {
        Err(SnapshotMetaError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return refuse("a snapshot name must not be empty");
    }
    if name.len() > MAX_SNAPSHOT_NAME_BYTES {
        return refuse("a snapshot name must be at most 255 bytes long");
    }
    if name.contains('/') {
        return refuse("a snapshot name must not contain '/'; use '-' or '_' instead");
    }
    if name.starts_with('.') {
        return refuse("a snapshot name must not start with '.'");
    }
    if name.chars().any(char::is_control) {
        return refuse("a snapshot name must not contain control characters (newline, tab, ...)");
    }
    Ok(())
}

/// The name libvirt gives a snapshot created without one: its creation
/// time in seconds since the epoch.
pub fn default_snapshot_name(creation_time: i64) -> String {
    creation_time.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::error::SnapshotMetaErrorKind;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "s1",
            "before upgrade",
            "2026-11-22T01:00",
            "é-ü",
            "a.b",
            &"x".repeat(255),
        ] {
            assert_eq!(validate_snapshot_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn default_name_is_the_creation_second() {
        assert_eq!(default_snapshot_name(1_795_310_675), "1795310675");
        assert_eq!(validate_snapshot_name(&default_snapshot_name(0)), Ok(()));
    }

    #[test]
    fn refuses_unsafe_names_with_reason() {
        let cases = [
            ("", "empty"),
            ("a/b", "'/'"),
            (".hidden", "start with '.'"),
            ("..", "start with '.'"),
            (".", "start with '.'"),
            ("a\nb", "control"),
            ("tab\there", "control"),
            ("del\u{7f}", "control"),
        ];
        for (name, why) in cases {
            let err = validate_snapshot_name(name).unwrap_err();
            assert_eq!(err.kind(), SnapshotMetaErrorKind::InvalidInput);
            assert!(err.to_string().contains(why), "{name:?}: {err}");
        }
        let long = "é".repeat(128); // 256 bytes, 128 chars
        assert!(validate_snapshot_name(&long)
            .unwrap_err()
            .to_string()
            .contains("255 bytes"));
    }
}
