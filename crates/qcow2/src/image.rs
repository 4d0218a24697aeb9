//! An open qcow2 image: metadata caches, guest reads and writes, cluster allocation.
//!
//! Metadata is cached in memory and written back by `flush` in an order that
//! keeps the file consistent at every step (QEMU's rules): refcount increases
//! reach the disk before anything references the new clusters; references are
//! removed before the refcounts they held are decreased. A crash at any point
//! can therefore only leak clusters.

use std::collections::HashMap;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vmsnap_qcow2_format::{
    self as fmt, decode_l2_entry, decode_snapshot_table, get_refcount, max_refcount, set_refcount,
    Header, L2Entry, SnapshotEntry, COMPRESSION_ZSTD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    INCOMPAT_KNOWN, OFFSET_MASK, OFLAG_COPIED,
};

use crate::disk::{check_range, open_disk, resolve_backing_path, BackingFile, Disk, ImageFormat};
use crate::error::{Error, Result};

/// How to treat the backing file named in an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Never open it: unallocated clusters read as zeros and guest writes are refused.
    Ignore,
    /// Open the file named in the header, only when its format is recorded there too.
    FromHeader,
    /// Open this file instead of the one in the header (its own backing files come from headers).
    Explicit(BackingFile),
}

/// How to open an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open for writing (takes QEMU's write locks).
    pub writable: bool,
    /// What to do with the backing file.
    pub backing: BackingPolicy,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            backing: BackingPolicy::FromHeader,
        }
    }
}

/// Version of the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// Version 2 ("compat=0.10").
    V2,
    /// Version 3 ("compat=1.1").
    #[default]
    V3,
}

impl Compat {
    /// The name qemu-img uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        }
    }
}

/// One internal snapshot as `qemu-img snapshot -l` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (QEMU assigns "1", "2", ...).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Bytes of saved VM state (0 for disk-only).
    pub vm_state_size: u64,
    /// Wall-clock seconds at creation.
    pub date_sec: u32,
    /// Wall-clock nanoseconds at creation.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
    /// Virtual disk size at creation.
    pub disk_size: u64,
}

/// What `qemu-img info` shows about a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image file.
    pub filename: PathBuf,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on disk.
    pub actual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Backing file name from the header.
    pub backing_filename: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// Whether the dirty bit is set.
    pub dirty: bool,
    /// Whether the corrupt bit is set.
    pub corrupt: bool,
    /// On-disk version.
    pub compat: Compat,
    /// Whether lazy refcounts are enabled.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// A cached L2 table.
pub(crate) struct L2Table {
    pub(crate) entries: Vec<u64>,
    pub(crate) dirty: bool,
}

/// A cached refcount block.
pub(crate) struct RefBlock {
    pub(crate) data: Vec<u8>,
    pub(crate) dirty: bool,
}

/// In-memory refcount structures (table always loaded, blocks on demand).
pub(crate) struct Refcounts {
    pub(crate) table: Vec<u64>,
    pub(crate) table_dirty: bool,
    pub(crate) blocks: Vec<Option<RefBlock>>,
    pub(crate) all_loaded: bool,
    pub(crate) free_hint: u64,
}

/// Clean L2 tables beyond this many bytes are dropped from the cache between guest requests.
const L2_CACHE_LIMIT_BYTES: u64 = 64 << 20;
/// Coalesced metadata reads and writes are split at this size.
const MAX_IO_RUN: u64 = 16 << 20;
/// Beyond this many merged ranges, `sync` writes back one span covering them all.
const MAX_SEPARATE_SYNC_RANGES: usize = 32;
/// Beyond this many separate unsynced write ranges, `sync` uses a plain fdatasync.
const MAX_TRACKED_RANGES: usize = 16384;
/// Backing chains deeper than this are refused (a loop that path checks missed).
const MAX_CHAIN_DEPTH: usize = 256;

/// An open qcow2 image.
pub struct Qcow2Image {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) writable: bool,
    pub(crate) header: Header,
    pub(crate) backing_name: Option<String>,
    pub(crate) file_len: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: bool,
    pub(crate) header_dirty: bool,
    pub(crate) l2: HashMap<u64, L2Table>,
    pub(crate) rc: Refcounts,
    pub(crate) snapshots: Vec<SnapshotEntry>,
    pub(crate) snapshots_size: u64,
    /// Indices of v3 snapshot entries whose extra data lacks the mandatory disk size
    /// (`check` reports them; `check -r all` rewrites the table in full).
    pub(crate) incomplete_snapshot_entries: Vec<usize>,
    pub(crate) backing: Option<Box<dyn Disk>>,
    pub(crate) pending_frees: Vec<(u64, u64)>,
    pub(crate) metadata: Option<HashMap<u64, MetaKind>>,
    compressed_cache: Option<(u64, Vec<u8>)>,
    unsynced: Unsynced,
    /// Whether this handle has issued any write to the file (see [`Qcow2Image::modified`]).
    modified: bool,
    /// Clusters whose refcount dropped to 0 while a snapshot delete or apply
    /// runs (`Some`), so it can give exactly those back to the file system.
    pub(crate) freed_clusters: Option<Vec<u64>>,
    writing_frees: bool,
    unsynced_ranges: Vec<(u64, u64)>,
    ranges_overflowed: bool,
    /// The in-memory L1 table points to an L2 table not yet written.
    l1_has_new_l2: bool,
    /// Tests: writes allowed before every further write fails as if the process died.
    #[cfg(test)]
    pub(crate) crash_after_writes: Option<usize>,
    /// Tests: a simulated crash happened, so nothing more may reach the file (not even on drop).
    #[cfg(test)]
    pub(crate) crashed: bool,
}

/// What a metadata cluster holds, for the overlap checks before writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    /// Header, L1 tables, refcount table and blocks, snapshot table.
    Fixed,
    /// An L2 table of the active L1 table.
    ActiveL2,
}

/// What was written since the last fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unsynced {
    Clean,
    /// Only refcount decrements (losing them leaks, nothing worse).
    FreesOnly,
    Dirty,
}

impl Qcow2Image {
    /// Opens an image; with `writable`, takes QEMU-compatible write locks.
    ///
    /// Refuses unknown incompatible features and, for writing, images marked
    /// corrupt. An image left dirty by lazy refcounts is repaired first when
    /// opened for writing, as QEMU does.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let mut chain = Vec::new();
        Self::open_inner(path, opts.writable, &opts.backing, &mut chain, false, true)
    }

    /// Opens an image for `check`: allowed on images marked corrupt or dirty, never
    /// repairs on its own, never opens the backing file. Pass `writable` to repair.
    pub fn open_for_check(path: &Path, writable: bool) -> Result<Self> {
        let mut chain = Vec::new();
        Self::open_inner(
            path,
            writable,
            &BackingPolicy::Ignore,
            &mut chain,
            true,
            true,
        )
    }

    /// Opens read-only without taking or checking locks, like `qemu-img -U` (force share).
    ///
    /// For inspecting an image a running QEMU has open (info, snapshot list): what it reads
    /// may be stale or inconsistent while QEMU writes, so never base writes on it.
    pub fn open_force_share(path: &Path) -> Result<Self> {
        let mut chain = Vec::new();
        Self::open_inner(
            path,
            false,
            &BackingPolicy::Ignore,
            &mut chain,
            false,
            false,
        )
    }

    fn open_inner(
        path: &Path,
        writable: bool,
        backing: &BackingPolicy,
        chain: &mut Vec<PathBuf>,
        for_repair: bool,
        lock: bool,
    ) -> Result<Self> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io(path, "open the image", e))?;
        if chain.contains(&canonical) {
            return Err(Error::corrupt(
                path,
                "backing chain loop: the image is its own backing file",
            ));
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(path, "backing chain is too deep"));
        }
        chain.push(canonical);
        let file = FsOpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open the image", e))?;
        if lock {
            crate::lock::lock_image(&file, path, writable)?;
        }
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat the image", e))?
            .len();
        // The header and its extensions live in the first cluster; read 64 KiB, more if the
        // cluster is larger.
        let mut first = vec![0u8; file_len.min(64 << 10) as usize];
        file.read_exact_at(&mut first, 0)
            .map_err(|e| Error::io(path, "read the header", e))?;
        if first.len() >= 24 {
            let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
            if (16..=fmt::MAX_CLUSTER_BITS).contains(&bits) && (1u64 << bits) > first.len() as u64 {
                first = vec![0u8; file_len.min(1u64 << bits) as usize];
                file.read_exact_at(&mut first, 0)
                    .map_err(|e| Error::io(path, "read the header", e))?;
            }
        }
        let header = Header::decode(&first).map_err(|e| Error::format(path, e))?;
        let unknown = header.unknown_incompatible(INCOMPAT_KNOWN);
        if !unknown.is_empty() {
            return Err(Error::unsupported(
                path,
                format!("image uses unsupported feature(s): {}", unknown.join(", ")),
            ));
        }
        if writable && !for_repair && header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Error::corrupt(
                path,
                "image is marked corrupt and cannot be opened for writing; repair it with check -r all",
            ));
        }
        let backing_name = match header.backing_name_range() {
            Some((off, len)) => {
                let (off, len) = (off as usize, len as usize);
                let bytes = first.get(off..off + len).ok_or_else(|| {
                    Error::corrupt(path, "backing file name is past the end of the file")
                })?;
                Some(String::from_utf8_lossy(bytes).into_owned())
            }
            None => None,
        };
        let cluster_size = header.cluster_size();
        let mut img = Qcow2Image {
            path: path.to_path_buf(),
            file,
            writable,
            l1: Vec::new(),
            l1_dirty: false,
            header_dirty: false,
            l2: HashMap::new(),
            rc: Refcounts {
                table: Vec::new(),
                table_dirty: false,
                blocks: Vec::new(),
                all_loaded: false,
                free_hint: 0,
            },
            snapshots: Vec::new(),
            snapshots_size: 0,
            incomplete_snapshot_entries: Vec::new(),
            backing: None,
            pending_frees: Vec::new(),
            metadata: None,
            compressed_cache: None,
            unsynced: Unsynced::Clean,
            modified: false,
            freed_clusters: None,
            writing_frees: false,
            unsynced_ranges: Vec::new(),
            ranges_overflowed: false,
            l1_has_new_l2: false,
            #[cfg(test)]
            crash_after_writes: None,
            #[cfg(test)]
            crashed: false,
            backing_name,
            file_len,
            header,
        };
        img.check_table_range(
            "L1 table",
            img.header.l1_table_offset,
            u64::from(img.header.l1_size) * 8,
        )?;
        let reftable_bytes = u64::from(img.header.refcount_table_clusters) * cluster_size;
        if img.header.refcount_table_offset >= file_len {
            return Err(Error::corrupt(
                path,
                format!(
                    "refcount table offset {:#x} is past the end of the file",
                    img.header.refcount_table_offset
                ),
            ));
        }
        let mut l1_bytes = vec![0u8; img.header.l1_size as usize * 8];
        img.pread(img.header.l1_table_offset, &mut l1_bytes, "L1 table")?;
        img.l1 = fmt::decode_u64_table(&l1_bytes);
        // The refcount table may end in a partial cluster at the end of the file; QEMU reads zeros there.
        let mut rt = vec![0u8; reftable_bytes as usize];
        let avail = (file_len - img.header.refcount_table_offset).min(reftable_bytes) as usize;
        img.pread(
            img.header.refcount_table_offset,
            &mut rt[..avail],
            "refcount table",
        )?;
        img.rc.table = fmt::decode_u64_table(&rt);
        img.rc.blocks = (0..img.rc.table.len()).map(|_| None).collect();
        img.read_snapshot_table()?;
        img.check_overlaps()?;
        if let Some(name) = img.backing_name.clone() {
            let target = match backing {
                BackingPolicy::Ignore => None,
                BackingPolicy::FromHeader => {
                    let format = img.header.backing_format().ok_or_else(|| {
                        Error::unsupported(
                            path,
                            format!(
                                "backing file '{name}' has no recorded format; give it explicitly (-F) instead of probing"
                            ),
                        )
                    })?;
                    let format: ImageFormat = format.parse().map_err(|e: String| {
                        Error::unsupported(path, format!("backing file '{name}': {e}"))
                    })?;
                    Some(BackingFile { path: name, format })
                }
                BackingPolicy::Explicit(b) => Some(b.clone()),
            };
            if let Some(b) = target {
                let bpath = resolve_backing_path(path, &b.path);
                let disk: Box<dyn Disk> = match b.format {
                    ImageFormat::Raw => {
                        open_disk(&bpath, ImageFormat::Raw, false, BackingPolicy::Ignore)?
                    }
                    ImageFormat::Qcow2 => Box::new(Self::open_inner(
                        &bpath,
                        false,
                        &BackingPolicy::FromHeader,
                        chain,
                        false,
                        true,
                    )?),
                };
                img.backing = Some(disk);
            }
        } else if let BackingPolicy::Explicit(b) = backing {
            let bpath = resolve_backing_path(path, &b.path);
            img.backing = Some(open_disk(
                &bpath,
                b.format,
                false,
                BackingPolicy::FromHeader,
            )?);
        }
        if writable && !for_repair && img.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            // Lazy refcounts were in use and the image was not closed: rebuild refcounts first.
            img.check(Some(crate::check::RepairMode::All))?;
            img.header.incompatible_features &= !INCOMPAT_DIRTY;
            img.write_header()?;
            img.sync()?;
        }
        Ok(img)
    }

    fn check_table_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > self.file_len)
        {
            return Err(Error::corrupt(
                &self.path,
                format!("{what} at {offset:#x} ({len} bytes) extends past the end of the file"),
            ));
        }
        Ok(())
    }

    /// Refuses images whose fixed metadata areas overlap each other.
    fn check_overlaps(&self) -> Result<()> {
        let cs = self.cluster_size();
        let h = &self.header;
        let areas = [
            ("header", 0u64, cs),
            ("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8),
            (
                "refcount table",
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
            ("snapshot table", h.snapshots_offset, self.snapshots_size),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                if a.2 == 0 || b.2 == 0 {
                    continue;
                }
                let a_end = fmt::align_up(a.1 + a.2, cs);
                let b_end = fmt::align_up(b.1 + b.2, cs);
                if a.1 < b_end && b.1 < a_end {
                    return Err(Error::corrupt(
                        &self.path,
                        format!("{} at {:#x} overlaps {} at {:#x}", a.0, a.1, b.0, b.1),
                    ));
                }
            }
        }
        Ok(())
    }

    fn read_snapshot_table(&mut self) -> Result<()> {
        let nb = self.header.nb_snapshots;
        self.incomplete_snapshot_entries.clear();
        if nb == 0 {
            self.snapshots.clear();
            self.snapshots_size = 0;
            return Ok(());
        }
        let off = self.header.snapshots_offset;
        if off >= self.file_len {
            return Err(Error::corrupt(
                &self.path,
                format!("snapshot table offset {off:#x} is past the end of the file"),
            ));
        }
        let max = (self.file_len - off).min(fmt::MAX_SNAPSHOT_TABLE_BYTES);
        let mut want = max.min(64 << 10);
        loop {
            let mut buf = vec![0u8; want as usize];
            self.pread(off, &mut buf, "snapshot table")?;
            match decode_snapshot_table(&buf, nb) {
                Ok((mut entries, size)) => {
                    // Version 3 makes the disk size mandatory; an entry without it is incomplete.
                    if self.header.version >= 3 {
                        self.incomplete_snapshot_entries = entries
                            .iter()
                            .enumerate()
                            .filter(|(_, e)| e.disk_size.is_none())
                            .map(|(i, _)| i)
                            .collect();
                    }
                    // QEMU reads a missing disk size as the image's current size and writes it back.
                    for e in &mut entries {
                        e.disk_size.get_or_insert(self.header.size);
                    }
                    self.snapshots = entries;
                    self.snapshots_size = size;
                    return Ok(());
                }
                Err(fmt::FormatError::Truncated { .. }) if want < max => {
                    want = (want * 4).min(max);
                }
                Err(e) => return Err(Error::format(&self.path, e)),
            }
        }
    }

    // ---- accessors -------------------------------------------------------

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded header (read-only view, for tools and tests).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file named in the header with its recorded format, if any.
    pub fn backing_file(&self) -> Option<(String, Option<String>)> {
        self.backing_name
            .clone()
            .map(|n| (n, self.header.backing_format()))
    }

    /// What `qemu-img info` reports.
    pub fn info(&self) -> ImageInfo {
        let actual_size = self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        ImageInfo {
            filename: self.path.clone(),
            virtual_size: self.size(),
            actual_size,
            cluster_size: self.cluster_size(),
            backing_filename: self.backing_name.clone(),
            backing_format: self.header.backing_format(),
            dirty: self.header.incompatible_features & INCOMPAT_DIRTY != 0,
            corrupt: self.header.incompatible_features & INCOMPAT_CORRUPT != 0,
            compat: if self.header.version >= 3 {
                Compat::V3
            } else {
                Compat::V2
            },
            lazy_refcounts: self.header.compatible_features & fmt::COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits: 1 << self.header.refcount_order,
            compression_type: if self.header.compression_type() == COMPRESSION_ZSTD {
                "zstd"
            } else {
                "zlib"
            },
            snapshots: self.snapshots(),
        }
    }

    /// Internal snapshots in table order.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount,
                disk_size: s.disk_size.unwrap_or(self.header.size),
            })
            .collect()
    }

    // ---- raw file I/O ----------------------------------------------------

    pub(crate) fn pread(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if offset
            .checked_add(buf.len() as u64)
            .map_or(true, |end| end > self.file_len)
        {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "{what} at {offset:#x} ({} bytes) extends past the end of the file",
                    buf.len()
                ),
            ));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, format!("read the {what} at {offset:#x}"), e))
    }

    pub(crate) fn pwrite(&mut self, offset: u64, data: &[u8], what: &str) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        #[cfg(test)]
        if let Some(left) = self.crash_after_writes.as_mut() {
            if *left == 0 {
                self.crashed = true;
                return Err(Error::io(
                    &self.path,
                    "write (simulated crash)",
                    std::io::Error::other("simulated crash"),
                ));
            }
            *left -= 1;
        }
        self.modified = true;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(&self.path, format!("write the {what} at {offset:#x}"), e))?;
        self.file_len = self.file_len.max(offset + data.len() as u64);
        self.note_unsynced_range(offset, data.len() as u64);
        self.unsynced = match (self.unsynced, self.writing_frees) {
            (Unsynced::Clean, true) => Unsynced::FreesOnly,
            (Unsynced::FreesOnly, true) => Unsynced::FreesOnly,
            _ => Unsynced::Dirty,
        };
        Ok(())
    }

    fn note_unsynced_range(&mut self, offset: u64, len: u64) {
        if self.ranges_overflowed || len == 0 {
            return;
        }
        if let Some(last) = self.unsynced_ranges.last_mut() {
            if offset >= last.0 && offset <= last.0 + last.1 {
                last.1 = last.1.max(offset + len - last.0);
                return;
            }
        }
        if self.unsynced_ranges.len() >= MAX_TRACKED_RANGES {
            self.ranges_overflowed = true;
            self.unsynced_ranges.clear();
        } else {
            self.unsynced_ranges.push((offset, len));
        }
    }

    /// Whether this handle has written to the file at all, even a write that failed.
    ///
    /// An operation that fails while this is still false was refused before it touched the
    /// image, so a caller can treat it as never started (no repair, no recovery needed).
    #[must_use]
    pub fn modified(&self) -> bool {
        self.modified
    }

    /// Makes everything this image wrote since the last call durable, skipped when nothing was.
    ///
    /// Only our own writes are flushed: their pages are written back with sync_file_range and
    /// then a one-sector O_DSYNC-style rewrite of the magic commits the file system journal
    /// and flushes the device cache (a range-limited fdatasync). Dirty pages someone else left
    /// in the page cache (a fresh `cp` of the image) are not ours to wait for. Falls back to a
    /// plain fdatasync where the kernel refuses either call, or after very many scattered writes.
    pub(crate) fn sync(&mut self) -> Result<()> {
        if self.unsynced == Unsynced::Clean {
            return Ok(());
        }
        let ranged = !self.ranges_overflowed && self.ranged_sync().is_ok();
        if !ranged {
            self.file
                .sync_data()
                .map_err(|e| Error::io(&self.path, "flush the image to disk", e))?;
        }
        self.unsynced = Unsynced::Clean;
        self.unsynced_ranges.clear();
        self.ranges_overflowed = false;
        Ok(())
    }

    fn ranged_sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        let mut ranges = std::mem::take(&mut self.unsynced_ranges);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (off, len) in ranges {
            match merged.last_mut() {
                Some(last) if off <= last.0 + last.1 => last.1 = last.1.max(off + len - last.0),
                _ => merged.push((off, len)),
            }
        }
        let call = |off: u64, len: u64, flags: libc::c_uint| -> std::io::Result<()> {
            // SAFETY: plain syscall on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::sync_file_range(fd, off as i64, len as i64, flags) };
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // Many scattered ranges (a COPIED pass rewrites every L2 table) cost
        // two calls each; one span over them all writes back the same pages
        // plus whatever else of this file is dirty in between, in two calls.
        if merged.len() > MAX_SEPARATE_SYNC_RANGES {
            let start = merged[0].0;
            let end = merged
                .iter()
                .map(|&(off, len)| off + len)
                .max()
                .unwrap_or(start);
            merged = vec![(start, end - start)];
        }
        // Start writeback of every range first, then wait for each: the I/Os overlap.
        for &(off, len) in &merged {
            call(off, len, libc::SYNC_FILE_RANGE_WRITE)?;
        }
        for &(off, len) in &merged {
            call(
                off,
                len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
        }
        let magic = fmt::MAGIC.to_be_bytes();
        let iov = libc::iovec {
            iov_base: magic.as_ptr() as *mut libc::c_void,
            iov_len: magic.len(),
        };
        // SAFETY: `iov` points at `magic`, which outlives the call; the kernel only reads it.
        let rc = unsafe { libc::pwritev2(fd, &iov, 1, 0, libc::RWF_DSYNC) };
        if rc != magic.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes refcount blocks that only hold decrements whose references are gone from disk.
    ///
    /// Losing these writes can only leak clusters, so `flush` does not sync for them alone.
    pub(crate) fn write_frees(&mut self) -> Result<()> {
        self.writing_frees = true;
        let result = self.write_refblocks();
        self.writing_frees = false;
        result.map(|_| ())
    }

    /// Rewrites the whole first cluster from the in-memory header.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let mut header = self.header.clone();
        let bytes = header
            .encode(self.backing_name.as_deref())
            .map_err(|e| Error::format(&self.path, e))?;
        let mut cluster = vec![
            0u8;
            self.cluster_size()
                .min(self.file_len.max(bytes.len() as u64)) as usize
        ];
        cluster[..bytes.len()].copy_from_slice(&bytes);
        self.pwrite(0, &cluster, "header")?;
        self.header = header;
        self.header_dirty = false;
        Ok(())
    }

    /// Rewrites only the fixed header fields (what QEMU updates in place).
    pub(crate) fn write_header_fields(&mut self) -> Result<()> {
        let len = self.header.header_length as usize;
        let mut buf = vec![0u8; len];
        self.header.encode_fields(&mut buf);
        self.pwrite(0, &buf, "header")?;
        self.header_dirty = false;
        Ok(())
    }

    // ---- L2 tables -------------------------------------------------------

    pub(crate) fn check_l2_offset(&self, l2_off: u64) -> Result<()> {
        let cs = self.cluster_size();
        if l2_off % cs != 0 {
            return Err(Error::corrupt(
                &self.path,
                format!("L2 table offset {l2_off:#x} is not cluster aligned"),
            ));
        }
        if l2_off < cs || l2_off.checked_add(cs).map_or(true, |e| e > self.file_len) {
            return Err(Error::corrupt(
                &self.path,
                format!("L2 table offset {l2_off:#x} is outside the image"),
            ));
        }
        Ok(())
    }

    /// Loads every listed L2 table not yet cached, coalescing adjacent reads.
    pub(crate) fn prefetch_l2(&mut self, offsets: &[u64]) -> Result<()> {
        let cs = self.cluster_size();
        let mut want: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|o| *o != 0 && !self.l2.contains_key(o))
            .collect();
        want.sort_unstable();
        want.dedup();
        for &o in &want {
            self.check_l2_offset(o)?;
        }
        let mut i = 0;
        while i < want.len() {
            let start = want[i];
            let mut j = i + 1;
            while j < want.len() && want[j] == want[j - 1] + cs && (want[j] - start) < MAX_IO_RUN {
                j += 1;
            }
            let n = (j - i) as u64;
            let mut buf = vec![0u8; (n * cs) as usize];
            self.pread(start, &mut buf, "L2 table")?;
            for (k, chunk) in buf.chunks_exact(cs as usize).enumerate() {
                self.l2.insert(
                    start + k as u64 * cs,
                    L2Table {
                        entries: fmt::decode_u64_table(chunk),
                        dirty: false,
                    },
                );
            }
            i = j;
        }
        Ok(())
    }

    pub(crate) fn load_l2(&mut self, l2_off: u64) -> Result<()> {
        if !self.l2.contains_key(&l2_off) {
            self.prefetch_l2(&[l2_off])?;
        }
        Ok(())
    }

    fn l2_index(&self, guest_cluster: u64) -> (usize, usize) {
        let l2_entries = self.header.l2_entries();
        (
            (guest_cluster / l2_entries) as usize,
            (guest_cluster % l2_entries) as usize,
        )
    }

    /// The raw L2 entry for a guest cluster (0 when no L2 table is allocated).
    pub(crate) fn raw_l2_entry(&mut self, guest_cluster: u64) -> Result<u64> {
        let (l1i, l2i) = self.l2_index(guest_cluster);
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(l2_off)?;
        Ok(self.l2[&l2_off].entries[l2i])
    }

    pub(crate) fn decode_entry(&self, raw: u64) -> Result<L2Entry> {
        decode_l2_entry(raw, self.header.cluster_bits, self.header.version)
            .map_err(|e| Error::format(&self.path, e))
    }

    /// Drops clean cached tables once the cache is large (between guest requests only).
    fn trim_caches(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        if self.l2.len() as u64 * cs > L2_CACHE_LIMIT_BYTES {
            if self.l2.values().any(|t| t.dirty) {
                self.flush_metadata()?;
            }
            self.l2.clear();
        }
        Ok(())
    }

    // ---- guest reads -----------------------------------------------------

    /// Reads guest bytes: allocated data, zeros, compressed data or the backing file.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len(), self.size())?;
        self.trim_caches()?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        // A run of contiguous host bytes still to be read: (host offset, buffer start, length).
        let mut run: Option<(u64, usize, usize)> = None;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(buf.len() - done);
            let raw = self.raw_l2_entry(pos / cs)?;
            let entry = self.decode_entry(raw)?;
            if let L2Entry::Normal { host, .. } = entry {
                let h = host + in_cluster;
                match run {
                    Some((rh, rs, rl)) if rh + rl as u64 == h && rs + rl == done => {
                        run = Some((rh, rs, rl + n));
                    }
                    _ => {
                        if let Some((rh, rs, rl)) = run.take() {
                            self.read_data(rh, &mut buf[rs..rs + rl])?;
                        }
                        run = Some((h, done, n));
                    }
                }
            } else {
                if let Some((rh, rs, rl)) = run.take() {
                    self.read_data(rh, &mut buf[rs..rs + rl])?;
                }
                self.read_unmapped(pos, entry, &mut buf[done..done + n])?;
            }
            done += n;
        }
        if let Some((rh, rs, rl)) = run {
            self.read_data(rh, &mut buf[rs..rs + rl])?;
        }
        Ok(())
    }

    fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        self.pread(host, buf, "data cluster")
    }

    /// Fills `buf` (within one cluster) for an entry that is not plain allocated data.
    fn read_unmapped(&mut self, pos: u64, entry: L2Entry, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        match entry {
            L2Entry::Unallocated => self.read_backing(pos, buf),
            L2Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            L2Entry::Compressed { host, len } => {
                let start = (pos % cs) as usize;
                let data = self.decompress(host, len)?;
                buf.copy_from_slice(&data[start..start + buf.len()]);
                Ok(())
            }
            L2Entry::Normal { host, .. } => self.read_data(host + pos % cs, buf),
        }
    }

    fn read_backing(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        if let Some(b) = self.backing.as_mut() {
            let bsize = b.size();
            if pos < bsize {
                let n = ((bsize - pos) as usize).min(buf.len());
                b.read_at(pos, &mut buf[..n])?;
            }
        }
        Ok(())
    }

    /// Decompresses the cluster whose stream starts at `host`.
    fn decompress(&mut self, host: u64, len: u64) -> Result<&[u8]> {
        if self
            .compressed_cache
            .as_ref()
            .map_or(true, |(h, _)| *h != host)
        {
            let cs = self.cluster_size() as usize;
            if host >= self.file_len {
                return Err(Error::corrupt(
                    &self.path,
                    format!("compressed cluster at {host:#x} is past the end of the file"),
                ));
            }
            let avail = (self.file_len - host).min(len) as usize;
            let mut input = vec![0u8; avail];
            self.pread(host, &mut input, "compressed cluster")?;
            let mut out = vec![0u8; cs];
            let ok = if self.header.compression_type() == COMPRESSION_ZSTD {
                decompress_zstd(&input, &mut out)
            } else {
                decompress_deflate(&input, &mut out)
            };
            if !ok {
                return Err(Error::corrupt(
                    &self.path,
                    format!(
                        "compressed cluster at {host:#x} does not decompress to a full cluster"
                    ),
                ));
            }
            self.compressed_cache = Some((host, out));
        }
        Ok(self
            .compressed_cache
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[]))
    }

    /// Whether guest bytes at `offset` are stored in this image (data, zero or compressed).
    ///
    /// Returns the answer and how many bytes from `offset` (at most `len`) share it.
    pub fn allocation(&mut self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let cs = self.cluster_size();
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return Ok((false, 0));
        }
        let first = self.raw_l2_entry(offset / cs)? != 0;
        let mut pos = offset;
        while pos < end {
            let allocated = self.raw_l2_entry(pos / cs)? != 0;
            if allocated != first {
                break;
            }
            pos = (pos / cs + 1) * cs;
        }
        Ok((first, pos.min(end) - offset))
    }

    // ---- refcounts -------------------------------------------------------

    pub(crate) fn refblock_entries(&self) -> u64 {
        fmt::refcount_block_entries(self.header.cluster_bits, self.header.refcount_order)
    }

    fn check_refblock_offset(&self, index: usize, off: u64) -> Result<()> {
        let cs = self.cluster_size();
        if off % cs != 0 || off < cs || off.checked_add(cs).map_or(true, |e| e > self.file_len) {
            return Err(Error::corrupt(
                &self.path,
                format!("refcount block {index} at {off:#x} is misaligned or outside the image"),
            ));
        }
        Ok(())
    }

    /// Loads every refcount block into memory, coalescing reads.
    pub(crate) fn load_all_refblocks(&mut self) -> Result<()> {
        if self.rc.all_loaded {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut want: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in self.rc.table.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off != 0 && self.rc.blocks[i].is_none() {
                self.check_refblock_offset(i, off)?;
                want.push((off, i));
            }
        }
        want.sort_unstable();
        let mut i = 0;
        while i < want.len() {
            let start = want[i].0;
            let mut j = i + 1;
            while j < want.len()
                && want[j].0 == want[j - 1].0 + cs
                && want[j].0 - start < MAX_IO_RUN
            {
                j += 1;
            }
            let mut buf = vec![0u8; ((j - i) as u64 * cs) as usize];
            self.pread(start, &mut buf, "refcount block")?;
            for (k, chunk) in buf.chunks_exact(cs as usize).enumerate() {
                let idx = want[i + k].1;
                if self.rc.blocks[idx].is_none() {
                    self.rc.blocks[idx] = Some(RefBlock {
                        data: chunk.to_vec(),
                        dirty: false,
                    });
                }
            }
            i = j;
        }
        self.rc.all_loaded = true;
        Ok(())
    }

    fn refblock(&mut self, index: usize) -> Result<Option<&mut RefBlock>> {
        if index >= self.rc.table.len() {
            return Ok(None);
        }
        let off = self.rc.table[index] & OFFSET_MASK;
        if off == 0 && self.rc.blocks[index].is_none() {
            return Ok(None);
        }
        if self.rc.blocks[index].is_none() {
            self.check_refblock_offset(index, off)?;
            let mut data = vec![0u8; self.cluster_size() as usize];
            self.pread(off, &mut data, "refcount block")?;
            self.rc.blocks[index] = Some(RefBlock { data, dirty: false });
        }
        Ok(self.rc.blocks[index].as_mut())
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block exists).
    pub(crate) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let per = self.refblock_entries();
        let order = self.header.refcount_order;
        let (b, i) = ((cluster / per) as usize, (cluster % per) as usize);
        Ok(match self.refblock(b)? {
            Some(block) => get_refcount(&block.data, order, i),
            None => 0,
        })
    }

    /// The refcount of `cluster` when its block is already in memory (None otherwise).
    #[inline]
    pub(crate) fn cached_refcount(&self, cluster: u64) -> Option<u64> {
        let per = self.refblock_entries();
        match self
            .rc
            .blocks
            .get((cluster >> per.trailing_zeros()) as usize)
        {
            Some(Some(block)) => Some(get_refcount(
                &block.data,
                self.header.refcount_order,
                (cluster & (per - 1)) as usize,
            )),
            _ => None,
        }
    }

    /// Sets a refcount; the covering block must exist (allocation ensures it).
    fn set_refcount_value(&mut self, cluster: u64, value: u64) -> Result<()> {
        let per = self.refblock_entries();
        let order = self.header.refcount_order;
        let path = self.path.clone();
        let (b, i) = ((cluster / per) as usize, (cluster % per) as usize);
        match self.refblock(b)? {
            Some(block) => {
                set_refcount(&mut block.data, order, i, value)
                    .map_err(|e| Error::format(&path, e))?;
                block.dirty = true;
                Ok(())
            }
            None => Err(Error::corrupt(
                &path,
                format!("cluster {cluster} has no refcount block"),
            )),
        }
    }

    /// Adds `delta` to the refcount of every cluster touched by `[offset, offset + len)`.
    ///
    /// `len == 0` means one cluster. Clusters whose count drops to zero are dropped from the caches.
    pub(crate) fn add_refcount(&mut self, offset: u64, len: u64, delta: i64) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let first = offset >> bits;
        let last = if len == 0 {
            first
        } else {
            (offset + len - 1) >> bits
        };
        let per = self.refblock_entries();
        let per_shift = per.trailing_zeros();
        let order = self.header.refcount_order;
        let max = max_refcount(order);
        for c in first..=last {
            // Fast path: the block is in memory and the count stays within 1..=max.
            if let Some(Some(block)) = self.rc.blocks.get_mut((c >> per_shift) as usize) {
                let i = (c & (per - 1)) as usize;
                let old = get_refcount(&block.data, order, i);
                // A reference added to a cluster with refcount 0 (slow path) means the
                // refcounts are wrong; dropping to 0 needs the cache clean-up below.
                let new = old
                    .checked_add_signed(delta)
                    .filter(|&n| n != 0 && n <= max && old != 0);
                if let Some(new) = new {
                    if new != old {
                        set_refcount(&mut block.data, order, i, new)
                            .map_err(|e| Error::format(&self.path, e))?;
                        block.dirty = true;
                    }
                    continue;
                }
            }
            let old = self.refcount(c)?;
            if delta > 0 && old == 0 {
                // Only snapshot operations add references, to clusters a table already uses.
                let detail = if c.saturating_mul(cs) >= self.file_len {
                    format!(
                        "a table maps guest data to {:#x}, past the end of the file; refusing to change the image",
                        c.saturating_mul(cs)
                    )
                } else {
                    format!(
                        "cluster {c} is in use but its refcount is 0; repair the image with `check -r all` first"
                    )
                };
                return Err(Error::corrupt(&self.path, detail));
            }
            let new = if delta >= 0 {
                let new = old.saturating_add(delta as u64);
                if new > max_refcount(self.header.refcount_order) {
                    return Err(Error::unsupported(
                        &self.path,
                        format!(
                            "refcount of cluster {c} would overflow its {} bits (too many snapshots for this refcount width)",
                            1 << self.header.refcount_order
                        ),
                    ));
                }
                new
            } else {
                old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                    Error::corrupt(
                        &self.path,
                        format!("refcount of cluster {c} would drop below zero"),
                    )
                })?
            };
            if new == old {
                continue;
            }
            if c == 0 && new == 0 {
                return Err(Error::corrupt(
                    &self.path,
                    "attempt to free the header cluster",
                ));
            }
            if new == 0 && old != 0 {
                self.forget_cluster(c * cs);
                self.rc.free_hint = self.rc.free_hint.min(c);
                if let Some(freed) = self.freed_clusters.as_mut() {
                    freed.push(c);
                }
            }
            self.set_refcount_value(c, new)?;
        }
        Ok(())
    }

    /// Drops any cached copy of a cluster that has just been freed.
    fn forget_cluster(&mut self, off: u64) {
        self.l2.remove(&off);
        if let Some(m) = self.metadata.as_mut() {
            m.remove(&off);
        }
        if self.compressed_cache.as_ref().is_some_and(|(h, _)| {
            *h / self.header.cluster_size() == off / self.header.cluster_size()
        }) {
            self.compressed_cache = None;
        }
    }

    /// Queues a refcount decrement, applied once nothing on disk references the cluster.
    pub(crate) fn free_later(&mut self, offset: u64, len: u64) {
        self.pending_frees.push((offset, len));
    }

    fn refblock_exists(&self, index: u64) -> bool {
        (index as usize) < self.rc.table.len()
            && (self.rc.table[index as usize] & OFFSET_MASK != 0
                || self.rc.blocks[index as usize].is_some())
    }

    /// Allocates `n` contiguous free clusters (refcount set to 1) and returns the first offset.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.load_all_refblocks()?;
        self.ensure_metadata_map()?;
        let cs = self.cluster_size();
        let per = self.refblock_entries();
        loop {
            let mut start = self.rc.free_hint.max(1);
            let mut c = start;
            while c < start + n {
                let rc = match self.cached_refcount(c) {
                    Some(rc) => rc,
                    None => self.refcount(c)?,
                };
                if rc != 0 || self.is_metadata(c * cs) {
                    start = c + 1;
                }
                c += 1;
            }
            if (start + n).saturating_mul(cs) > fmt::MAX_HOST_OFFSET {
                return Err(Error::unsupported(
                    &self.path,
                    "image file would exceed 2^56 bytes",
                ));
            }
            let missing = (start / per..=(start + n - 1) / per).find(|&b| !self.refblock_exists(b));
            match missing {
                Some(b) if (b as usize) < self.rc.table.len() => {
                    // The new block goes into the first free cluster and counts itself if it covers it.
                    let at = start;
                    self.rc.blocks[b as usize] = Some(RefBlock {
                        data: vec![0u8; cs as usize],
                        dirty: true,
                    });
                    self.rc.table[b as usize] = at * cs;
                    self.rc.table_dirty = true;
                    self.set_refcount_value(at, 1)?;
                    self.mark_metadata(at * cs, cs);
                    continue;
                }
                Some(b) => {
                    self.grow_refcount_table(b + 1)?;
                    continue;
                }
                None => {}
            }
            for c in start..start + n {
                self.set_refcount_value(c, 1)?;
            }
            self.rc.free_hint = start + n;
            return Ok(start * cs);
        }
    }

    /// Highest cluster index with a nonzero refcount, plus one.
    fn used_end(&mut self) -> Result<u64> {
        let per = self.refblock_entries();
        let order = self.header.refcount_order;
        for b in (0..self.rc.table.len()).rev() {
            if let Some(block) = self.refblock(b)? {
                for i in (0..per as usize).rev() {
                    if get_refcount(&block.data, order, i) != 0 {
                        return Ok(b as u64 * per + i as u64 + 1);
                    }
                }
            }
        }
        Ok(0)
    }

    /// Moves the refcount table to the end of the image with room for `min_entries` blocks.
    ///
    /// New blocks for the new table and for themselves are placed just before it, as QEMU
    /// does; the header switches to the new table only after it is on disk.
    fn grow_refcount_table(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per = self.refblock_entries();
        let end = self.used_end()?.max(self.file_len.div_ceil(cs));
        let mut entries = min_entries.max(self.rc.table.len() as u64 * 2).max(cs / 8);
        let mut new_blocks = 0u64;
        let (table_clusters, missing) = loop {
            let table_clusters = (entries * 8).div_ceil(cs);
            let area_end = end + new_blocks + table_clusters;
            let needed_entries = area_end.div_ceil(per);
            if needed_entries > entries {
                entries = needed_entries;
                continue;
            }
            let missing: Vec<u64> = (end / per..=(area_end - 1) / per)
                .filter(|&b| !self.refblock_exists(b))
                .collect();
            if missing.len() as u64 == new_blocks {
                break (table_clusters, missing);
            }
            new_blocks = missing.len() as u64;
        };
        if table_clusters * cs > fmt::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                &self.path,
                "refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        let new_len = (table_clusters * cs / 8) as usize;
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.rc.table.resize(new_len, 0);
        self.rc.blocks.resize_with(new_len, || None);
        for (k, &b) in missing.iter().enumerate() {
            self.rc.table[b as usize] = (end + k as u64) * cs;
            self.rc.blocks[b as usize] = Some(RefBlock {
                data: vec![0u8; cs as usize],
                dirty: true,
            });
        }
        let table_offset = (end + new_blocks) * cs;
        for c in end..end + new_blocks + table_clusters {
            self.set_refcount_value(c, 1)?;
            self.mark_metadata(c * cs, cs);
        }
        self.write_refblocks()?;
        let bytes = fmt::encode_u64_table(&self.rc.table);
        self.pwrite(table_offset, &bytes, "refcount table")?;
        self.sync()?;
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.write_header_fields()?;
        self.sync()?;
        self.rc.table_dirty = false;
        self.free_later(old_offset, old_clusters * cs);
        Ok(())
    }

    // ---- metadata overlap protection --------------------------------------

    /// Builds the set of clusters holding metadata, so allocation never hands one out.
    ///
    /// Refcounts should already say these are in use; this guards against images whose
    /// refcounts are wrong (QEMU's overlap check does the same job).
    fn ensure_metadata_map(&mut self) -> Result<()> {
        if self.metadata.is_some() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut map = HashMap::new();
        let add_range = |map: &mut HashMap<u64, MetaKind>, off: u64, len: u64| {
            let mut c = off / cs * cs;
            while c < off.saturating_add(len) {
                map.insert(c, MetaKind::Fixed);
                c += cs;
            }
        };
        add_range(&mut map, 0, cs);
        add_range(
            &mut map,
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
        );
        add_range(
            &mut map,
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
        );
        add_range(&mut map, self.header.snapshots_offset, self.snapshots_size);
        for s in &self.snapshots {
            add_range(&mut map, s.l1_table_offset, u64::from(s.l1_size) * 8);
        }
        for &e in &self.rc.table {
            if e & OFFSET_MASK != 0 {
                map.insert(e & OFFSET_MASK, MetaKind::Fixed);
            }
        }
        for &e in &self.l1 {
            if e & OFFSET_MASK != 0 {
                map.entry(e & OFFSET_MASK).or_insert(MetaKind::ActiveL2);
            }
        }
        self.metadata = Some(map);
        Ok(())
    }

    fn is_metadata(&self, off: u64) -> bool {
        self.metadata.as_ref().is_some_and(|m| m.contains_key(&off))
    }

    /// Records that the clusters of `[off, off + len)` hold metadata other than L2 tables.
    pub(crate) fn mark_metadata(&mut self, off: u64, len: u64) {
        let cs = self.cluster_size();
        if let Some(m) = self.metadata.as_mut() {
            let mut c = off / cs * cs;
            while c < off.saturating_add(len.max(1)) {
                m.insert(c, MetaKind::Fixed);
                c += cs;
            }
        }
    }

    /// Refuses a write to `off` that would land on metadata of another kind (QEMU's overlap check).
    fn check_overlap(&mut self, off: u64, allowed: Option<MetaKind>, what: &str) -> Result<()> {
        self.ensure_metadata_map()?;
        let found = self.metadata.as_ref().and_then(|m| m.get(&off)).copied();
        if found.is_some() && found != allowed {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "{what} at {off:#x} overlaps the {}; refusing to write",
                    self.describe_metadata(off)
                ),
            ));
        }
        Ok(())
    }

    /// The metadata clusters as sorted, merged `[start, end)` host ranges of one kind each.
    ///
    /// Table walks check every entry against this list with a binary search: no I/O and
    /// no hashing per cluster.
    pub(crate) fn metadata_ranges(&mut self) -> Result<Vec<(u64, u64, MetaKind)>> {
        self.ensure_metadata_map()?;
        let cs = self.cluster_size();
        let mut clusters: Vec<(u64, MetaKind)> = self
            .metadata
            .as_ref()
            .map(|m| m.iter().map(|(&o, &k)| (o, k)).collect())
            .unwrap_or_default();
        clusters.sort_unstable_by_key(|&(o, _)| o);
        let mut ranges: Vec<(u64, u64, MetaKind)> = Vec::with_capacity(clusters.len());
        for (off, kind) in clusters {
            match ranges.last_mut() {
                Some(last) if last.1 == off && last.2 == kind => last.1 = off + cs,
                _ => ranges.push((off, off + cs, kind)),
            }
        }
        Ok(ranges)
    }

    /// Names the metadata structure that holds host offset `off` (for error messages).
    pub(crate) fn describe_metadata(&self, off: u64) -> String {
        let cs = self.cluster_size();
        let h = &self.header;
        let within = |start: u64, len: u64| {
            len > 0 && off >= start / cs * cs && off < fmt::align_up(start.saturating_add(len), cs)
        };
        if off < cs {
            return "image header".into();
        }
        if within(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return format!("active L1 table at {:#x}", h.l1_table_offset);
        }
        if within(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        ) {
            return format!("refcount table at {:#x}", h.refcount_table_offset);
        }
        if within(h.snapshots_offset, self.snapshots_size) {
            return format!("snapshot table at {:#x}", h.snapshots_offset);
        }
        if let Some(s) = self
            .snapshots
            .iter()
            .find(|s| within(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return format!(
                "L1 table of snapshot '{}' at {:#x}",
                s.name, s.l1_table_offset
            );
        }
        let cluster = off / cs * cs;
        if let Some(i) = self
            .rc
            .table
            .iter()
            .position(|&e| e & OFFSET_MASK == cluster)
        {
            return format!("refcount block {i} at {cluster:#x}");
        }
        if self.l1.iter().any(|&e| e & OFFSET_MASK == cluster) {
            return format!("active L2 table at {cluster:#x}");
        }
        format!("metadata cluster at {cluster:#x}")
    }

    // ---- guest writes ----------------------------------------------------

    /// Before the first change of guest data: refuses images with persistent dirty bitmaps
    /// (this engine does not update them, and silently invalidating them would break
    /// incremental backups), and clears unknown autoclear feature bits as the spec requires.
    ///
    /// The header change is synced first, so nothing claims to track data it missed.
    pub(crate) fn before_guest_change(&mut self) -> Result<()> {
        let has_bitmaps = self.header.autoclear_features & fmt::AUTOCLEAR_BITMAPS != 0
            && self
                .header
                .extension(fmt::EXT_BITMAPS)
                .is_some_and(|d| d.len() >= 4 && d[..4] != [0, 0, 0, 0]);
        if has_bitmaps {
            return Err(Error::unsupported(
                &self.path,
                "image has persistent dirty bitmaps, which this engine does not update; remove them (qemu-img bitmap --remove) before changing guest data",
            ));
        }
        if self.header.autoclear_features != 0 {
            self.header.autoclear_features = 0;
            self.write_header_fields()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes guest bytes, allocating clusters and copying shared ones first.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        check_range(&self.path, offset, data.len(), self.size())?;
        self.before_guest_change()?;
        if self.backing_name.is_some() && self.backing.is_none() {
            return Err(Error::unsupported(
                &self.path,
                "writing needs the backing file, which was not opened",
            ));
        }
        self.trim_caches()?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        let mut run: Option<(u64, usize, usize)> = None;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = ((cs - in_cluster) as usize).min(data.len() - done);
            let target = self.cluster_for_write(pos / cs, in_cluster, &data[done..done + n])?;
            match target {
                Some(host) => {
                    let h = host + in_cluster;
                    match run {
                        Some((rh, rs, rl)) if rh + rl as u64 == h && rs + rl == done => {
                            run = Some((rh, rs, rl + n));
                        }
                        _ => {
                            if let Some((rh, rs, rl)) = run.take() {
                                self.pwrite(rh, &data[rs..rs + rl], "guest data")?;
                            }
                            run = Some((h, done, n));
                        }
                    }
                }
                None => {
                    if let Some((rh, rs, rl)) = run.take() {
                        self.pwrite(rh, &data[rs..rs + rl], "guest data")?;
                    }
                }
            }
            done += n;
        }
        if let Some((rh, rs, rl)) = run {
            self.pwrite(rh, &data[rs..rs + rl], "guest data")?;
        }
        Ok(())
    }

    /// Makes the guest cluster writable in place and returns its host offset, or
    /// writes `chunk` itself (copy-on-write of a partial cluster) and returns None.
    fn cluster_for_write(
        &mut self,
        guest_cluster: u64,
        in_cluster: u64,
        chunk: &[u8],
    ) -> Result<Option<u64>> {
        let cs = self.cluster_size();
        let (l1i, l2i) = self.l2_index(guest_cluster);
        let l2_off = self.l2_for_write(l1i)?;
        let raw = self.l2[&l2_off].entries[l2i];
        let entry = self.decode_entry(raw)?;
        let full = chunk.len() as u64 == cs;
        match entry {
            L2Entry::Normal { host, copied } if self.refcount(host / cs)? == 1 => {
                self.check_overlap(host, None, "data cluster")?;
                if !copied {
                    self.set_l2_entry(l2_off, l2i, host | OFLAG_COPIED);
                }
                return Ok(Some(host));
            }
            L2Entry::Zero {
                host: Some(host), ..
            } if self.refcount(host / cs)? == 1 => {
                self.check_overlap(host, None, "data cluster")?;
                if !full {
                    let mut buf = vec![0u8; cs as usize];
                    buf[in_cluster as usize..in_cluster as usize + chunk.len()]
                        .copy_from_slice(chunk);
                    self.pwrite(host, &buf, "guest data")?;
                }
                self.set_l2_entry(l2_off, l2i, host | OFLAG_COPIED);
                return Ok(if full { Some(host) } else { None });
            }
            _ => {}
        }
        let old = if full {
            None
        } else {
            let mut buf = vec![0u8; cs as usize];
            let pos = guest_cluster * cs;
            let valid = (self.size() - pos).min(cs) as usize;
            match entry {
                L2Entry::Normal { host, .. } => self.read_data(host, &mut buf[..valid])?,
                other => self.read_unmapped(pos, other, &mut buf[..valid])?,
            }
            Some(buf)
        };
        let new = self.alloc_clusters(1)?;
        if let Some((h, len)) = entry.host_range() {
            self.free_later(h, len);
        }
        // The table may have been evicted while allocating (never while dirty); reload it.
        self.load_l2(l2_off)?;
        self.set_l2_entry(l2_off, l2i, new | OFLAG_COPIED);
        match old {
            None => Ok(Some(new)),
            Some(mut buf) => {
                buf[in_cluster as usize..in_cluster as usize + chunk.len()].copy_from_slice(chunk);
                self.pwrite(new, &buf, "guest data")?;
                Ok(None)
            }
        }
    }

    pub(crate) fn set_l2_entry(&mut self, l2_off: u64, index: usize, value: u64) {
        if let Some(t) = self.l2.get_mut(&l2_off) {
            if t.entries[index] != value {
                t.entries[index] = value;
                t.dirty = true;
            }
        }
    }

    /// Returns an L2 table for L1 index `l1i` that may be modified: allocated or copied as needed.
    fn l2_for_write(&mut self, l1i: usize) -> Result<u64> {
        let cs = self.cluster_size();
        let raw = *self.l1.get(l1i).ok_or_else(|| {
            Error::corrupt(&self.path, format!("L1 index {l1i} is beyond the L1 table"))
        })?;
        let off = raw & OFFSET_MASK;
        if off != 0 {
            if !self.l2.contains_key(&off) {
                self.check_l2_offset(off)?;
            }
            if self.refcount(off / cs)? == 1 {
                self.check_overlap(off, Some(MetaKind::ActiveL2), "L2 table")?;
                self.load_l2(off)?;
                if raw & OFLAG_COPIED == 0 {
                    self.l1[l1i] = off | OFLAG_COPIED;
                    self.l1_dirty = true;
                }
                return Ok(off);
            }
            self.load_l2(off)?;
        }
        let entries = if off != 0 {
            self.l2[&off].entries.clone()
        } else {
            vec![0u64; (cs / 8) as usize]
        };
        let new = self.alloc_clusters(1)?;
        if let Some(m) = self.metadata.as_mut() {
            m.insert(new, MetaKind::ActiveL2);
        }
        self.l2.insert(
            new,
            L2Table {
                entries,
                dirty: true,
            },
        );
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty = true;
        if off != 0 {
            self.free_later(off, cs);
        }
        Ok(new)
    }

    // ---- write-back ------------------------------------------------------

    /// Writes dirty refcount blocks and the refcount table (coalesced); returns whether any were.
    pub(crate) fn write_refblocks(&mut self) -> Result<bool> {
        let cs = self.cluster_size();
        let mut dirty: Vec<(u64, usize)> = self
            .rc
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.as_ref().is_some_and(|b| b.dirty))
            .map(|(i, _)| (self.rc.table[i] & OFFSET_MASK, i))
            .collect();
        dirty.sort_unstable();
        let wrote = !dirty.is_empty() || self.rc.table_dirty;
        let mut i = 0;
        while i < dirty.len() {
            let start = dirty[i].0;
            let mut j = i + 1;
            while j < dirty.len()
                && dirty[j].0 == dirty[j - 1].0 + cs
                && dirty[j].0 - start < MAX_IO_RUN
            {
                j += 1;
            }
            let mut buf = Vec::with_capacity(((j - i) as u64 * cs) as usize);
            for &(_, idx) in &dirty[i..j] {
                if let Some(b) = self.rc.blocks[idx].as_ref() {
                    buf.extend_from_slice(&b.data);
                }
            }
            self.pwrite(start, &buf, "refcount block")?;
            for &(_, idx) in &dirty[i..j] {
                if let Some(b) = self.rc.blocks[idx].as_mut() {
                    b.dirty = false;
                }
            }
            i = j;
        }
        if self.rc.table_dirty {
            let bytes = fmt::encode_u64_table(&self.rc.table);
            let off = self.header.refcount_table_offset;
            self.pwrite(off, &bytes, "refcount table")?;
            self.rc.table_dirty = false;
        }
        Ok(wrote)
    }

    /// Writes dirty L2 tables, then the active L1 table and header; returns whether any were.
    pub(crate) fn write_tables(&mut self) -> Result<bool> {
        let cs = self.cluster_size();
        let mut dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        let wrote = !dirty.is_empty() || self.l1_dirty || self.header_dirty;
        let mut i = 0;
        while i < dirty.len() {
            let start = dirty[i];
            let mut j = i + 1;
            while j < dirty.len() && dirty[j] == dirty[j - 1] + cs && dirty[j] - start < MAX_IO_RUN
            {
                j += 1;
            }
            let mut buf = Vec::with_capacity(((j - i) as u64 * cs) as usize);
            for o in &dirty[i..j] {
                buf.extend_from_slice(&fmt::encode_u64_table(&self.l2[o].entries));
            }
            self.pwrite(start, &buf, "L2 table")?;
            for o in &dirty[i..j] {
                if let Some(t) = self.l2.get_mut(o) {
                    t.dirty = false;
                }
            }
            i = j;
        }
        if self.l1_dirty {
            // A new L2 table must be on disk before the L1 entry that points to it.
            if self.l1_has_new_l2 {
                self.sync()?;
                self.l1_has_new_l2 = false;
            }
            let bytes = fmt::encode_u64_table(&self.l1);
            self.pwrite(self.header.l1_table_offset, &bytes, "L1 table")?;
            self.l1_dirty = false;
        }
        if self.header_dirty {
            self.write_header_fields()?;
        }
        Ok(wrote)
    }

    /// Applies queued refcount decrements (their references are already gone from disk).
    pub(crate) fn apply_pending_frees(&mut self) -> Result<()> {
        let frees = std::mem::take(&mut self.pending_frees);
        for (off, len) in frees {
            self.add_refcount(off, len, -1)?;
        }
        Ok(())
    }

    /// Writes all cached metadata in crash-safe order and syncs.
    pub(crate) fn flush_metadata(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.write_refblocks()? {
            self.sync()?;
        }
        if self.write_tables()? {
            self.sync()?;
        }
        if !self.pending_frees.is_empty() {
            self.apply_pending_frees()?;
            self.write_frees()?;
        }
        Ok(())
    }

    /// Makes every write so far durable, metadata included.
    ///
    /// Refcount decrements written last are not synced on their own: losing them
    /// in a power failure only leaks clusters, which `check -r leaks` gives back.
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_metadata()?;
        if self.unsynced == Unsynced::Dirty {
            self.sync()?;
        }
        Ok(())
    }

    /// Forgets unwritten metadata changes and reloads the active L1 table (after a failed operation).
    pub(crate) fn discard_unwritten(&mut self) -> Result<()> {
        self.l2.clear();
        self.rc.blocks.iter_mut().for_each(|b| *b = None);
        self.rc.all_loaded = false;
        self.pending_frees.clear();
        self.metadata = None;
        self.compressed_cache = None;
        let mut first = vec![0u8; self.file_len.min(self.cluster_size()) as usize];
        self.pread(0, &mut first, "header")?;
        self.header = Header::decode(&first).map_err(|e| Error::format(&self.path, e))?;
        let mut l1_bytes = vec![0u8; self.header.l1_size as usize * 8];
        self.pread(self.header.l1_table_offset, &mut l1_bytes, "L1 table")?;
        self.l1 = fmt::decode_u64_table(&l1_bytes);
        self.l1_dirty = false;
        self.l1_has_new_l2 = false;
        self.header_dirty = false;
        let bytes = u64::from(self.header.refcount_table_clusters) * self.cluster_size();
        let mut rt = vec![0u8; bytes as usize];
        let avail = (self
            .file_len
            .saturating_sub(self.header.refcount_table_offset))
        .min(bytes) as usize;
        self.pread(
            self.header.refcount_table_offset,
            &mut rt[..avail],
            "refcount table",
        )?;
        self.rc.table = fmt::decode_u64_table(&rt);
        self.rc.blocks = (0..self.rc.table.len()).map(|_| None).collect();
        self.rc.table_dirty = false;
        self.read_snapshot_table()
    }

    /// Grows the active L1 table to at least `min_entries`, moving it as QEMU does.
    ///
    /// The new table is written and synced before the header points to it; the old one is freed after.
    pub(crate) fn grow_l1(&mut self, min_entries: u64) -> Result<()> {
        if min_entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if min_entries * 8 > fmt::MAX_L1_BYTES {
            return Err(Error::unsupported(
                &self.path,
                "L1 table would exceed QEMU's 32 MiB limit",
            ));
        }
        self.flush_metadata()?;
        let cs = self.cluster_size();
        // Grow by 1.5x like QEMU so repeated growth stays cheap.
        let mut entries = (self.l1.len() as u64 * 3 / 2).max(min_entries);
        entries = entries.min(fmt::MAX_L1_BYTES / 8);
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(cs);
        let new_off = self.alloc_clusters(clusters)?;
        self.mark_metadata(new_off, clusters * cs);
        self.write_refblocks()?;
        self.sync()?;
        let mut new_l1 = self.l1.clone();
        new_l1.resize(entries as usize, 0);
        let mut buf = fmt::encode_u64_table(&new_l1);
        buf.resize((clusters * cs) as usize, 0);
        self.pwrite(new_off, &buf, "L1 table")?;
        self.sync()?;
        let old_off = self.header.l1_table_offset;
        let old_len = u64::from(self.header.l1_size) * 8;
        self.header.l1_table_offset = new_off;
        self.header.l1_size = entries as u32;
        self.write_header_fields()?;
        self.sync()?;
        self.l1 = new_l1;
        if old_len > 0 {
            self.free_later(old_off, old_len);
            self.apply_pending_frees()?;
            self.write_frees()?;
        }
        Ok(())
    }

    /// Grows the virtual disk (shrinking is refused: it would discard guest data).
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        if new_size % 512 != 0 {
            return Err(Error::invalid(
                &self.path,
                "image size must be a multiple of 512 bytes",
            ));
        }
        if new_size < self.size() {
            return Err(Error::unsupported(
                &self.path,
                "shrinking an image is not supported",
            ));
        }
        if self.header.version < 3 && !self.snapshots.is_empty() {
            return Err(Error::unsupported(
                &self.path,
                "cannot resize a version 2 (compat 0.10) image that has snapshots",
            ));
        }
        self.flush()?;
        let need = self.header.l1_entries_for(new_size);
        self.grow_l1(need)?;
        self.header.size = new_size;
        self.write_header_fields()?;
        self.sync()
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed {
            return;
        }
        if self.writable {
            // Errors cannot be reported from drop; callers who care call flush() first.
            let _ = self.flush();
        }
    }
}

/// Inflates a raw deflate stream (as QEMU writes it) into exactly `out.len()` bytes.
///
/// Like QEMU, a stream that fills the cluster counts even without its end marker: the
/// descriptor's sector count may cut trailing bytes of the stream.
fn decompress_deflate(input: &[u8], out: &mut [u8]) -> bool {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)
        .is_ok()
        && d.total_out() == out.len() as u64
}

/// Decodes zstd frames until `out` is full.
fn decompress_zstd(input: &[u8], out: &mut [u8]) -> bool {
    let mut src = input;
    let mut filled = 0;
    while filled < out.len() && !src.is_empty() {
        let mut dec = match ruzstd::decoding::StreamingDecoder::new(&mut src) {
            Ok(d) => d,
            Err(_) => return false,
        };
        loop {
            match dec.read(&mut out[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(_) => return false,
            }
            if filled == out.len() {
                break;
            }
        }
    }
    filled == out.len()
}
