//! Image work for images no QEMU has open, through vmsnap's own qcow2 engine
//! (overlay creation, internal snapshots, rebase), and the few facts about
//! images open in a running QEMU that are asked of QEMU instead.

use std::path::{Path, PathBuf};

use vmsnap_qcow2::{
    BackingFile, BackingPolicy, CreateOptions, ImageFormat, OpenOptions, Qcow2Image,
};
use vmsnap_qmp::Qmp;

use super::error::{Result, SnapshotError};
use super::model::Layer;
use super::runtime::qmp_error;
use crate::config::DiskFormat;

fn image_error(path: &Path) -> impl FnOnce(vmsnap_qcow2::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Image {
        path,
        source: Box::new(source),
    }
}

fn engine_format(format: DiskFormat) -> ImageFormat {
    match format {
        DiskFormat::Raw => ImageFormat::Raw,
        DiskFormat::Qcow2 => ImageFormat::Qcow2,
    }
}

fn open(path: &Path, writable: bool) -> Result<Qcow2Image> {
    Qcow2Image::open(
        path,
        OpenOptions {
            writable,
            backing: BackingPolicy::Ignore,
        },
    )
    .map_err(image_error(path))
}

fn utf8(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| SnapshotError::Invalid(format!("path {} is not UTF-8", path.display())))
}

/// The guest-visible size of a layer.
pub fn virtual_size(layer: &Layer) -> Result<u64> {
    match layer.format {
        DiskFormat::Raw => std::fs::metadata(&layer.file)
            .map(|m| m.len())
            .map_err(|source| SnapshotError::Io {
                action: "cannot read the size of".into(),
                path: layer.file.clone(),
                source,
            }),
        DiskFormat::Qcow2 => Ok(open(&layer.file, false)?.size()),
    }
}

/// The guest-visible size of the image behind a running QEMU's node.
pub async fn live_virtual_size(domain: &str, qmp: &Qmp, node: &str) -> Result<u64> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(qmp_error(domain, "query-named-block-nodes"))?;
    nodes
        .iter()
        .find(|n| n.node_name == node)
        .and_then(|n| n.image.as_ref().map(|i| i.virtual_size))
        .ok_or_else(|| {
            SnapshotError::Conflict(format!("QEMU of domain {domain} has no block node {node}"))
        })
}

/// Creates a qcow2 overlay of `size` bytes whose header names `backing`
/// (path and format). The backing image is not opened, so this works while a
/// running QEMU writes to it; the overlay is private (0600). The file is
/// made exclusively (never through a symlink, never over an existing file),
/// and removed again when it cannot be written (a full file system), so a
/// refusal leaves nothing behind.
pub fn create_overlay(path: &Path, backing: &Layer, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => SnapshotError::FileExists {
                what: "overlay".into(),
                path: path.to_path_buf(),
            },
            _ => SnapshotError::Io {
                action: "cannot create overlay".into(),
                path: path.to_path_buf(),
                source,
            },
        })?;
    let written = write_overlay(path, backing, size);
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Fills the empty file `path` with the overlay's metadata.
fn write_overlay(path: &Path, backing: &Layer, size: u64) -> Result<()> {
    let options = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    vmsnap_qcow2::create(path, ImageFormat::Qcow2, &options).map_err(image_error(path))?;
    set_private(path)?;
    let header_backing = BackingFile {
        path: utf8(&backing.file)?,
        format: engine_format(backing.format),
    };
    vmsnap_qcow2::rebase(path, Some(header_backing), true).map_err(image_error(path))?;
    let file = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
        action: "cannot open the new overlay".into(),
        path: path.to_path_buf(),
        source,
    })?;
    file.sync_all().map_err(|source| SnapshotError::Io {
        action: "cannot write the new overlay".into(),
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `image` holds an internal snapshot named `tag`.
pub fn has_tag(image: &Path, tag: &str) -> Result<bool> {
    Ok(open(image, false)?
        .snapshots()
        .iter()
        .any(|s| s.name == tag))
}

/// Whether the image behind a running QEMU's node holds snapshot `tag`.
pub async fn live_has_tag(domain: &str, qmp: &Qmp, node: &str, tag: &str) -> Result<bool> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(qmp_error(domain, "query-named-block-nodes"))?;
    Ok(nodes
        .iter()
        .find(|n| n.node_name == node)
        .and_then(|n| n.image.as_ref())
        .and_then(|i| i.snapshots.as_ref())
        .is_some_and(|snaps| snaps.iter().any(|s| s.name == tag)))
}

/// Why creating an internal snapshot in a closed image failed, and whether
/// the image may have been changed on the way (only then does the journal
/// entry need recovery's rollback and repair).
pub struct TagFailure {
    /// What went wrong, for the user.
    pub error: Box<SnapshotError>,
    /// Whether anything was written to the image before the failure.
    pub image_changed: bool,
}

/// Creates a disk-only internal snapshot `tag` in a closed image.
pub fn create_tag(image: &Path, tag: &str) -> std::result::Result<(), TagFailure> {
    let untouched = |error| TagFailure {
        error: Box::new(error),
        image_changed: false,
    };
    let mut img = open(image, true).map_err(untouched)?;
    let result = img.create_snapshot(tag).and_then(|_| img.flush());
    result.map_err(|source| TagFailure {
        image_changed: img.modified(),
        error: Box::new(image_error(image)(source)),
    })
}

/// Deletes internal snapshot `tag` from a closed image, if it is there.
pub fn delete_tag_if_present(image: &Path, tag: &str) -> Result<()> {
    let mut img = open(image, true)?;
    if img.snapshots().iter().any(|s| s.name == tag) {
        img.delete_snapshot(tag).map_err(image_error(image))?;
        img.flush().map_err(image_error(image))?;
    }
    Ok(())
}

/// Deletes every internal snapshot but `keep` from a closed image (a clone's
/// copies of snapshots whose records name the original).
pub fn delete_tags_except(image: &Path, keep: &str) -> Result<()> {
    let mut img = open(image, true)?;
    let doomed: Vec<String> = img
        .snapshots()
        .iter()
        .filter(|s| s.name != keep)
        .map(|s| s.id.clone())
        .collect();
    for id in doomed {
        img.delete_snapshot(&id).map_err(image_error(image))?;
    }
    img.flush().map_err(image_error(image))
}

/// Makes internal snapshot `tag` the live content of a closed image.
pub fn apply_tag(image: &Path, tag: &str) -> Result<()> {
    let mut img = open(image, true)?;
    img.apply_snapshot(tag).map_err(image_error(image))?;
    img.flush().map_err(image_error(image))
}

/// Copies an image (to make a writable copy of one whose live content other
/// snapshots still need); the copy is private (0600).
pub fn clone_image(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        return Err(SnapshotError::FileExists {
            what: "image copy".into(),
            path: to.to_path_buf(),
        });
    }
    copy_sparse(from, to).map_err(|source| SnapshotError::Io {
        action: format!("cannot copy {} to", from.display()),
        path: to.to_path_buf(),
        source,
    })
}

/// Copies a file's data extents only (SEEK_DATA/SEEK_HOLE), so the holes
/// deleted snapshots left in an image stay holes in its copy, and makes the
/// copy durable (records name it right after). The copy is private (0600).
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let source = std::fs::File::open(from)?;
    let len = source.metadata()?.len();
    let target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    target.set_len(len)?;
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor `source` owns; no memory is passed.
        let at = unsafe { libc::lseek(source.as_raw_fd(), offset as libc::off_t, whence) };
        match at {
            -1 => match std::io::Error::last_os_error() {
                err if err.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                err => Err(err),
            },
            at => Ok(Some(at as u64)),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            source.read_exact_at(&mut buf[..n], at)?;
            target.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    target.sync_all()
}

/// Pulls `frozen`'s data into `child` (whose backing it is) and makes `base`
/// the child's backing, so `frozen` can go: a safe rebase by the engine.
pub fn rebase(child: &Layer, frozen: &Layer, base: &Layer) -> Result<()> {
    // The safe rebase reads the old chain from the child's header: point it
    // at the recorded frozen image first, so only configured files are read.
    let old = BackingFile {
        path: utf8(&frozen.file)?,
        format: engine_format(frozen.format),
    };
    vmsnap_qcow2::rebase(&child.file, Some(old), true).map_err(image_error(&child.file))?;
    let new = BackingFile {
        path: utf8(&base.file)?,
        format: engine_format(base.format),
    };
    vmsnap_qcow2::rebase(&child.file, Some(new), false).map_err(image_error(&child.file))
}

fn set_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SnapshotError::Io {
            action: "cannot make private".into(),
            path: PathBuf::from(path),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

    #[test]
    fn a_copy_keeps_the_holes_and_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        let file = std::fs::File::create(&from).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[0x5a; 4096], 0).unwrap();
        file.write_all_at(&[0x6b; 1 << 20], 40 << 20).unwrap();
        file.write_all_at(&[0x7c; 512], (64 << 20) - 512).unwrap();
        clone_image(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let meta = std::fs::metadata(&to).unwrap();
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "the copy is not sparse: {} bytes allocated",
            meta.blocks() * 512
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            clone_image(&from, &to),
            Err(SnapshotError::FileExists { .. })
        ));
    }
}
