//! virsh's `--memspec` and `--diskspec` option values, parsed as virsh does:
//! comma-separated `key=value` items, a bare first item naming the file (for
//! memspec) or the disk (for diskspec), and `,,` standing for a literal comma.

use std::path::PathBuf;

use super::error::{Result, SnapshotError};
use crate::snapshot::meta::DiskSnapshotMode;

/// `--memspec [file=]PATH[,snapshot=MODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemSpec {
    /// Where the memory goes: external, internal or no (disk-only).
    pub mode: DiskSnapshotMode,
    /// The memory image's path (external only).
    pub file: Option<PathBuf>,
}

/// `--diskspec DISK[,snapshot=MODE][,driver=qcow2][,file=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk target (`vda`).
    pub target: String,
    /// How to snapshot it; `None` leaves the choice to the snapshot's kind.
    pub mode: Option<DiskSnapshotMode>,
    /// The overlay's path (external only).
    pub file: Option<PathBuf>,
}

/// Splits on single commas, turning `,,` into a literal comma.
fn split_items(text: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("never empty").push(c);
        }
    }
    items
}

fn parse_mode(option: &str, value: &str) -> Result<DiskSnapshotMode> {
    DiskSnapshotMode::parse(value).ok_or_else(|| {
        SnapshotError::Invalid(format!(
            "{option}: snapshot={value} is not one of internal, external, no"
        ))
    })
}

fn absolute(option: &str, value: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(SnapshotError::Invalid(format!("{option}: empty file name")));
    }
    let path = PathBuf::from(value);
    if path.is_absolute() {
        return Ok(path);
    }
    let cwd = std::env::current_dir().map_err(|source| SnapshotError::Io {
        action: "cannot resolve the current directory for".into(),
        path: path.clone(),
        source,
    })?;
    Ok(cwd.join(path))
}

impl MemSpec {
    /// Parses a `--memspec` value.
    pub fn parse(text: &str) -> Result<MemSpec> {
        let mut spec = MemSpec {
            mode: DiskSnapshotMode::External,
            file: None,
        };
        let mut explicit_mode = false;
        for (index, item) in split_items(text).iter().enumerate() {
            match item.split_once('=') {
                Some(("file", value)) => spec.file = Some(absolute("--memspec", value)?),
                Some(("snapshot", value)) => {
                    spec.mode = parse_mode("--memspec", value)?;
                    explicit_mode = true;
                }
                None if index == 0 && !item.is_empty() => {
                    spec.file = Some(absolute("--memspec", item)?)
                }
                _ => {
                    return Err(SnapshotError::Invalid(format!(
                        "--memspec: unknown item '{item}' (expected file=PATH or snapshot=MODE)"
                    )))
                }
            }
        }
        if !explicit_mode && spec.file.is_none() {
            return Err(SnapshotError::Invalid(
                "--memspec needs file=PATH or snapshot=no|internal".into(),
            ));
        }
        match spec.mode {
            DiskSnapshotMode::External if spec.file.is_none() => Err(SnapshotError::Invalid(
                "--memspec snapshot=external needs file=PATH".into(),
            )),
            DiskSnapshotMode::Internal | DiskSnapshotMode::No if spec.file.is_some() => {
                Err(SnapshotError::Invalid(format!(
                    "--memspec snapshot={} takes no file",
                    spec.mode.as_str()
                )))
            }
            _ => Ok(spec),
        }
    }
}

impl DiskSpec {
    /// Parses a `--diskspec` value.
    pub fn parse(text: &str) -> Result<DiskSpec> {
        let items = split_items(text);
        let target = items[0].clone();
        if target.is_empty() || target.contains('=') {
            return Err(SnapshotError::Invalid(format!(
                "--diskspec '{text}' must start with the disk's target (e.g. vda)"
            )));
        }
        let mut spec = DiskSpec {
            target,
            mode: None,
            file: None,
        };
        for item in &items[1..] {
            match item.split_once('=') {
                Some(("snapshot", value)) => spec.mode = Some(parse_mode("--diskspec", value)?),
                Some(("file", value)) => spec.file = Some(absolute("--diskspec", value)?),
                Some(("driver", "qcow2")) => {}
                Some(("driver", other)) => {
                    return Err(SnapshotError::Invalid(format!(
                        "--diskspec {}: overlays are qcow2, not {other}",
                        spec.target
                    )))
                }
                _ => {
                    return Err(SnapshotError::Invalid(format!(
                        "--diskspec {}: unknown item '{item}' (expected snapshot=, file= or driver=qcow2)",
                        spec.target
                    )))
                }
            }
        }
        if spec.file.is_some() {
            match spec.mode {
                None => spec.mode = Some(DiskSnapshotMode::External),
                Some(DiskSnapshotMode::External) => {}
                Some(other) => {
                    return Err(SnapshotError::Invalid(format!(
                        "--diskspec {}: file= needs snapshot=external, not {}",
                        spec.target,
                        other.as_str()
                    )))
                }
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memspec_forms() {
        let spec = MemSpec::parse("file=/s/m.mem,snapshot=external").unwrap();
        assert_eq!(spec.file, Some(PathBuf::from("/s/m.mem")));
        assert_eq!(spec.mode, DiskSnapshotMode::External);
        assert_eq!(
            MemSpec::parse("/a,,b").unwrap().file,
            Some(PathBuf::from("/a,b"))
        );
        assert_eq!(
            MemSpec::parse("snapshot=no").unwrap().mode,
            DiskSnapshotMode::No
        );
        assert!(MemSpec::parse("snapshot=external").is_err());
        assert!(MemSpec::parse("bogus=1").is_err());
        assert!(MemSpec::parse("snapshot=internal,file=/x").is_err());
    }

    #[test]
    fn diskspec_forms() {
        let spec = DiskSpec::parse("vda,snapshot=external,file=/o/vda.qcow2").unwrap();
        assert_eq!(spec.target, "vda");
        assert_eq!(spec.mode, Some(DiskSnapshotMode::External));
        assert_eq!(spec.file, Some(PathBuf::from("/o/vda.qcow2")));
        let spec = DiskSpec::parse("vdb,snapshot=no").unwrap();
        assert_eq!(spec.mode, Some(DiskSnapshotMode::No));
        assert_eq!(
            DiskSpec::parse("vdc,file=/x").unwrap().mode,
            Some(DiskSnapshotMode::External)
        );
        assert!(DiskSpec::parse("vda,snapshot=internal,file=/x").is_err());
        assert!(DiskSpec::parse("vda,driver=raw").is_err());
        assert!(DiskSpec::parse("snapshot=no").is_err());
    }
}
