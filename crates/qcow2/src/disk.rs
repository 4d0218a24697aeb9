//! Disks of either format, so a backing chain can mix raw and qcow2 images.

use std::fmt;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::image::{BackingPolicy, OpenOptions, Qcow2Image};

/// An image format; never guessed from content for backing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// Plain guest bytes.
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!(
                "unknown image format '{other}' (expected raw or qcow2)"
            )),
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// A backing file and its format, as given with `-b`/`-F` or recorded in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// Path as written into the overlay's header (relative paths are relative to the overlay).
    pub path: String,
    /// Format of the backing file.
    pub format: ImageFormat,
}

/// Guest-visible block device: what a backing chain is made of.
pub trait Disk: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads guest bytes; reads past the end are refused.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes guest bytes.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> Result<()>;
    /// The image file.
    fn path(&self) -> &Path;
    /// The image's format.
    fn format(&self) -> ImageFormat;
    /// Whether guest bytes at `offset` are stored in this layer (not in its backing file).
    ///
    /// Returns the length of the run starting at `offset`, at most `len`, that has the same answer.
    fn allocation(&mut self, offset: u64, len: u64) -> Result<(bool, u64)>;
}

/// A raw image: guest byte N is file byte N.
pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RawImage {
    /// Opens a raw image (locked as QEMU would lock it).
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = FsOpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open the image", e))?;
        crate::lock::lock_image(&file, path, writable)?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(path, "stat the image", e))?
            .len();
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// Creates (or truncates) a raw image of `size` bytes, sparse.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let file = FsOpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "create the image", e))?;
        file.set_len(size)
            .map_err(|e| Error::io(path, "set the image size", e))?;
        file.sync_all()
            .map_err(|e| Error::io(path, "sync the image", e))
    }
}

impl Disk for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("read {} bytes at {offset}", buf.len()),
                e,
            )
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(&self.path, offset, data.len(), self.size)?;
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                &self.path,
                format!("write {} bytes at {offset}", data.len()),
                e,
            )
        })
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "flush", e))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn allocation(&mut self, _offset: u64, len: u64) -> Result<(bool, u64)> {
        Ok((true, len))
    }
}

impl Disk for Qcow2Image {
    fn size(&self) -> u64 {
        Qcow2Image::size(self)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Qcow2Image::read_at(self, offset, buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        Qcow2Image::write_at(self, offset, data)
    }

    fn flush(&mut self) -> Result<()> {
        Qcow2Image::flush(self)
    }

    fn path(&self) -> &Path {
        Qcow2Image::path(self)
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<(bool, u64)> {
        Qcow2Image::allocation(self, offset, len)
    }
}

pub(crate) fn check_range(path: &Path, offset: u64, len: usize, size: u64) -> Result<()> {
    if offset
        .checked_add(len as u64)
        .map_or(true, |end| end > size)
    {
        return Err(Error::invalid(
            path,
            format!("access of {len} bytes at offset {offset} is beyond the {size}-byte disk"),
        ));
    }
    Ok(())
}

/// Opens an image of a known format, following qcow2 backing files by `backing`.
pub fn open_disk(
    path: &Path,
    format: ImageFormat,
    writable: bool,
    backing: BackingPolicy,
) -> Result<Box<dyn Disk>> {
    match format {
        ImageFormat::Raw => Ok(Box::new(RawImage::open(path, writable)?)),
        ImageFormat::Qcow2 => Ok(Box::new(Qcow2Image::open(
            path,
            OpenOptions { writable, backing },
        )?)),
    }
}

/// Resolves a backing file name as QEMU does: relative to the overlay's directory.
pub fn resolve_backing_path(overlay: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        b.to_path_buf()
    } else {
        overlay
            .parent()
            .map(|dir| dir.join(b))
            .unwrap_or_else(|| b.to_path_buf())
    }
}

/// Reads whether a file starts with the qcow2 magic, for commands that name an image explicitly.
///
/// Only for top-level images a user names on the command line; backing files are never probed.
pub fn detect_format(path: &Path) -> Result<ImageFormat> {
    let file = File::open(path).map_err(|e| Error::io(path, "open the image", e))?;
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if u32::from_be_bytes(magic) == vmsnap_qcow2_format::MAGIC => Ok(ImageFormat::Qcow2),
        Ok(()) => Ok(ImageFormat::Raw),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(ImageFormat::Raw),
        Err(e) => Err(Error::io(path, "read the image", e)),
    }
}
