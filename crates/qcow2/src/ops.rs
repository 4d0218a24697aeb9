//! Whole-image operations: create, commit and rebase.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmsnap_qcow2_format::{self as fmt, Header, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};

use crate::disk::{open_disk, resolve_backing_path, BackingFile, Disk, ImageFormat, RawImage};
use crate::error::{Error, Result};
use crate::image::{BackingPolicy, Compat, OpenOptions, Qcow2Image};

/// Options of `create`, with qemu-img's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; 0 with a backing file means "the backing file's size".
    pub size: u64,
    /// Cluster size in bytes (qcow2 only): a power of two from 512 to 2 MiB.
    pub cluster_size: u32,
    /// On-disk version (qcow2 only).
    pub compat: Compat,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (qcow2 only; 16 for compat 0.10).
    pub refcount_bits: u32,
    /// Backing file for an overlay (qcow2 only).
    pub backing: Option<BackingFile>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat: Compat::V3,
            refcount_bits: 16,
            backing: None,
        }
    }
}

/// Opens a backing file as an overlay would see it, to learn its size and prove it is usable.
fn open_backing_for(overlay: &Path, backing: &BackingFile) -> Result<Box<dyn Disk>> {
    let path = resolve_backing_path(overlay, &backing.path);
    open_disk(&path, backing.format, false, BackingPolicy::FromHeader)
}

/// Creates a raw or qcow2 image, as `qemu-img create`. Validates everything before touching the file.
pub fn create(path: &Path, format: ImageFormat, opts: &CreateOptions) -> Result<()> {
    let mut size = opts.size;
    if let Some(b) = &opts.backing {
        if format == ImageFormat::Raw {
            return Err(Error::invalid(
                path,
                "raw images cannot have a backing file",
            ));
        }
        let backing = open_backing_for(path, b)?;
        if size == 0 {
            // QEMU's block layer counts whole sectors, so an odd-sized raw file rounds up.
            size = fmt::align_up(backing.size(), 512);
        }
    }
    match format {
        ImageFormat::Raw => RawImage::create(path, size),
        ImageFormat::Qcow2 => create_qcow2(path, size, opts),
    }
}

fn create_qcow2(path: &Path, size: u64, opts: &CreateOptions) -> Result<()> {
    let cs = u64::from(opts.cluster_size);
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::invalid(
            path,
            format!("cluster size {cs} must be a power of two between 512 and 2M"),
        ));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::invalid(
            path,
            format!(
                "refcount width {} must be a power of two from 1 to 64",
                opts.refcount_bits
            ),
        ));
    }
    if opts.compat == Compat::V2 && opts.refcount_bits != 16 {
        return Err(Error::invalid(
            path,
            "different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    if size % 512 != 0 {
        return Err(Error::invalid(
            path,
            "image size must be a multiple of 512 bytes",
        ));
    }
    if size > i64::MAX as u64 {
        return Err(Error::invalid(path, "image size is too large"));
    }
    let cluster_bits = cs.trailing_zeros();
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let version = if opts.compat == Compat::V2 { 2 } else { 3 };
    let mut header = Header::new(version, cluster_bits, refcount_order, size);
    let l1_entries = header.l1_entries_for(size);
    if l1_entries * 8 > fmt::MAX_L1_BYTES {
        return Err(Error::invalid(
            path,
            format!("size {size} needs an L1 table larger than 32 MiB; use a larger cluster size"),
        ));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    // Header, refcount table, refcount blocks, L1 table; the blocks must also count themselves.
    let per = fmt::refcount_block_entries(cluster_bits, refcount_order);
    let mut blocks = 1u64;
    let mut table_clusters = 1u64;
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    if table_clusters * cs > fmt::MAX_REFTABLE_BYTES {
        return Err(Error::invalid(path, "image too large for its cluster size"));
    }
    let table_off = cs;
    let blocks_off = table_off + table_clusters * cs;
    let l1_off = blocks_off + blocks * cs;
    header.refcount_table_offset = table_off;
    header.refcount_table_clusters = table_clusters as u32;
    header.l1_table_offset = l1_off;
    header.l1_size = l1_entries as u32;
    if version >= 3 {
        header.set_extension(EXT_FEATURE_TABLE, Some(fmt::qemu_feature_table()));
    }
    let backing_name = opts.backing.as_ref().map(|b| b.path.clone());
    if let Some(b) = &opts.backing {
        header.set_extension(EXT_BACKING_FORMAT, Some(b.format.to_string().into_bytes()));
    }
    let header_bytes = header
        .encode(backing_name.as_deref())
        .map_err(|e| Error::format(path, e))?;

    let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
    for (b, slot) in table.iter_mut().enumerate().take(blocks as usize) {
        *slot = blocks_off + b as u64 * cs;
    }
    let used = 1 + table_clusters + blocks + l1_clusters;
    let mut block_area = vec![0u8; (blocks * cs) as usize];
    for c in 0..used {
        let b = c / per;
        let blk = &mut block_area[(b * cs) as usize..((b + 1) * cs) as usize];
        fmt::set_refcount(blk, refcount_order, (c % per) as usize, 1)
            .map_err(|e| Error::format(path, e))?;
    }

    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(path, "create the image", e))?;
    crate::lock::lock_image(&file, path, true)?;
    let io = |e| Error::io(path, "write the new image", e);
    let mut first = vec![0u8; cs as usize];
    first[..header_bytes.len()].copy_from_slice(&header_bytes);
    file.write_all_at(&first, 0).map_err(io)?;
    file.write_all_at(&fmt::encode_u64_table(&table), table_off)
        .map_err(io)?;
    file.write_all_at(&block_area, blocks_off).map_err(io)?;
    if l1_entries > 0 {
        file.write_all_at(&vec![0u8; (l1_entries * 8) as usize], l1_off)
            .map_err(io)?;
    }
    file.sync_all().map_err(io)
}

/// Outcome of `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// The image that received the data.
    pub backing: String,
    /// Guest bytes copied.
    pub bytes_copied: u64,
}

/// Copies an overlay's data into its backing file, then empties the overlay, as `qemu-img commit`.
///
/// The backing file is named by the overlay's header and must have its format recorded there.
/// The overlay keeps its backing link, so it reads the same before and after.
pub fn commit(top: &Path) -> Result<CommitReport> {
    let mut overlay = Qcow2Image::open(
        top,
        OpenOptions {
            writable: true,
            backing: BackingPolicy::Ignore,
        },
    )?;
    let (name, format) = overlay
        .backing_file()
        .ok_or_else(|| Error::invalid(top, "image has no backing file to commit into"))?;
    let format: ImageFormat = format
        .ok_or_else(|| {
            Error::unsupported(
                top,
                format!("backing file '{name}' has no recorded format; rebase with -F first"),
            )
        })?
        .parse()
        .map_err(|e: String| Error::unsupported(top, e))?;
    let backing_path = resolve_backing_path(top, &name);
    if backing_path.canonicalize().ok() == top.canonicalize().ok() {
        return Err(Error::corrupt(top, "image is its own backing file"));
    }
    let mut base = open_disk(&backing_path, format, true, BackingPolicy::FromHeader)?;
    let size = overlay.size();
    if base.size() < size {
        match format {
            ImageFormat::Raw => {
                let f = FsOpenOptions::new()
                    .write(true)
                    .open(&backing_path)
                    .map_err(|e| Error::io(&backing_path, "open the image", e))?;
                f.set_len(size)
                    .map_err(|e| Error::io(&backing_path, "grow the image", e))?;
                base = open_disk(&backing_path, format, true, BackingPolicy::FromHeader)?;
            }
            ImageFormat::Qcow2 => {
                drop(base);
                let mut q = Qcow2Image::open(
                    &backing_path,
                    OpenOptions {
                        writable: true,
                        backing: BackingPolicy::FromHeader,
                    },
                )?;
                q.resize(size)?;
                base = Box::new(q);
            }
        }
    }
    let chunk = (overlay.cluster_size() * 64).max(1 << 20);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    let mut copied = 0;
    while pos < size {
        let (allocated, len) = overlay.allocation(pos, chunk.min(size - pos))?;
        if allocated {
            let b = &mut buf[..len as usize];
            overlay.read_at(pos, b)?;
            base.write_at(pos, b)?;
            copied += len;
        }
        pos += len.max(1);
    }
    base.flush()?;
    drop(base);
    overlay.make_empty()?;
    overlay.flush()?;
    Ok(CommitReport {
        backing: name,
        bytes_copied: copied,
    })
}

impl Qcow2Image {
    /// Drops every cluster of the active state so all reads go to the backing file.
    ///
    /// The L1 table is cleared on disk first, then the references it held are released.
    pub(crate) fn make_empty(&mut self) -> Result<()> {
        self.flush()?;
        self.before_guest_change()?;
        let zeros = vec![0u64; self.l1.len()];
        let old_l1 = std::mem::replace(&mut self.l1, zeros);
        self.l1_dirty = true;
        self.write_tables()?;
        self.sync()?;
        let result = self.tree_refcount_pass(&old_l1, -1).and_then(|_| {
            self.write_refblocks()?;
            self.sync()
        });
        if result.is_err() {
            let _ = self.discard_unwritten();
        }
        result
    }

    /// Points the header at a new backing file (or none) without touching guest data.
    pub(crate) fn set_backing(&mut self, backing: Option<&BackingFile>) -> Result<()> {
        self.flush()?;
        self.backing_name = backing.map(|b| b.path.clone());
        self.header.set_extension(
            EXT_BACKING_FORMAT,
            backing.map(|b| b.format.to_string().into_bytes()),
        );
        self.write_header()?;
        self.sync()
    }
}

/// Changes an overlay's backing file, as `qemu-img rebase`.
///
/// With `unsafe_` only the header changes. Otherwise every cluster the overlay does not
/// store is compared between the old and new backing chains and copied into the overlay
/// where they differ, so the guest sees the same bytes afterwards.
pub fn rebase(image: &Path, new_backing: Option<BackingFile>, unsafe_: bool) -> Result<()> {
    if let Some(b) = &new_backing {
        let p = resolve_backing_path(image, &b.path);
        if p.canonicalize().ok() == image.canonicalize().ok() {
            return Err(Error::invalid(
                image,
                "an image cannot be its own backing file",
            ));
        }
    }
    if unsafe_ {
        let mut img = Qcow2Image::open(
            image,
            OpenOptions {
                writable: true,
                backing: BackingPolicy::Ignore,
            },
        )?;
        return img.set_backing(new_backing.as_ref());
    }
    let mut new_disk = match &new_backing {
        Some(b) => Some(open_backing_for(image, b)?),
        None => None,
    };
    let mut img = Qcow2Image::open(
        image,
        OpenOptions {
            writable: true,
            backing: BackingPolicy::FromHeader,
        },
    )?;
    let cs = img.cluster_size();
    let size = img.size();
    let chunk = (cs * 16).max(1 << 20);
    let mut old_buf = vec![0u8; chunk as usize];
    let mut new_buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let (allocated, len) = img.allocation(pos, chunk.min(size - pos))?;
        let len = len.max(1).min(size - pos);
        if !allocated {
            let old = &mut old_buf[..len as usize];
            img.read_at(pos, old)?;
            let new = &mut new_buf[..len as usize];
            new.fill(0);
            if let Some(d) = new_disk.as_mut() {
                let dsize = d.size();
                if pos < dsize {
                    let n = (dsize - pos).min(len) as usize;
                    d.read_at(pos, &mut new[..n])?;
                }
            }
            // Copy whole clusters that differ (reads of allocated clusters go nowhere near the backing).
            let mut off = 0u64;
            while off < len {
                let cluster_start = pos + off;
                let n = (cs - cluster_start % cs).min(len - off);
                let range = off as usize..(off + n) as usize;
                if old[range.clone()] != new[range.clone()] {
                    img.write_at(cluster_start, &old[range])?;
                }
                off += n;
            }
        }
        pos += len;
    }
    img.set_backing(new_backing.as_ref())
}
