//! Consistency check and repair, as `qemu-img check [-r leaks|all]`.
//!
//! Reference counts are recomputed in memory by walking everything that can
//! hold a reference (header, active and snapshot L1/L2 trees, snapshot table,
//! refcount table and blocks, bitmap directory and tables) and compared with
//! the refcount blocks. Messages use qemu-img's wording.

use vmsnap_qcow2_format::{
    self as fmt, get_refcount, set_refcount, L2Entry, AUTOCLEAR_BITMAPS, EXT_BITMAPS,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::image::{Qcow2Image, RefBlock};

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Leaks, refcounts that are too low, refcount structures and COPIED flags.
    All,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors that kept parts of the check from running.
    pub check_errors: u64,
    /// Inconsistencies that can lose data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Offset just past the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active state.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not directly after the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters in the active state.
    pub compressed_clusters: u64,
    /// One line per problem found, in qemu-img's words (it prints them on stderr).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img's exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// A COPIED-flag repair: L1 index, new L1 entry, (L2 index, new L2 entry) pairs.
type CopiedFix = (usize, u64, Vec<(usize, u64)>);

/// L2 tables read by a check are kept for reuse up to this many bytes.
const CHECK_TABLE_CACHE_BYTES: u64 = 256 << 20;

/// Reference counts computed by walking the metadata.
struct Computed {
    counts: Vec<u32>,
    cluster_bits: u32,
}

impl Computed {
    /// Adds one reference to every cluster in `[offset, offset + len)` (len 0: one cluster).
    fn inc(&mut self, report: &mut CheckReport, offset: u64, len: u64, what: &str) {
        let first = offset >> self.cluster_bits;
        let last = if len == 0 {
            first
        } else {
            (offset + len - 1) >> self.cluster_bits
        };
        for c in first..=last {
            match self.counts.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    report.messages.push(format!(
                        "ERROR {what} at offset {:#x} is past the end of the image",
                        c << self.cluster_bits
                    ));
                    report.corruptions += 1;
                    return;
                }
            }
        }
    }

    /// Adds one reference to the cluster at `offset` (the hot path of the walk).
    #[inline]
    fn inc_cluster(&mut self, report: &mut CheckReport, offset: u64, what: &str) {
        match self.counts.get_mut((offset >> self.cluster_bits) as usize) {
            Some(n) => *n = n.saturating_add(1),
            None => self.inc(report, offset, 0, what),
        }
    }

    fn get(&self, c: u64) -> u64 {
        self.counts
            .get(c as usize)
            .copied()
            .map(u64::from)
            .unwrap_or(0)
    }
}

impl Qcow2Image {
    /// Checks the image and optionally repairs it; a repair is followed by a second check.
    pub fn check(&mut self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() && !self.writable {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.flush()?;
        let mut report = CheckReport::default();
        self.check_pass(repair, &mut report)?;
        if repair.is_some() {
            let fixed = (report.leaks_fixed, report.corruptions_fixed);
            if fixed.0 + fixed.1 > 0 {
                let mut second = CheckReport::default();
                self.check_pass(None, &mut second)?;
                let mut messages = std::mem::take(&mut report.messages);
                messages.append(&mut second.messages);
                report = second;
                report.messages = messages;
                report.leaks_fixed = fixed.0;
                report.corruptions_fixed = fixed.1;
            }
            let flags = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
            if report.check_errors == 0
                && report.corruptions == 0
                && self.header.incompatible_features & flags != 0
            {
                self.header.incompatible_features &= !flags;
                self.write_header_fields()?;
                self.sync()?;
            }
        }
        Ok(report)
    }

    fn check_pass(&mut self, repair: Option<RepairMode>, report: &mut CheckReport) -> Result<()> {
        let cs = self.cluster_size();
        let nb_clusters = self.file_len.div_ceil(cs);
        let mut computed = Computed {
            counts: vec![0u32; nb_clusters as usize],
            cluster_bits: self.header.cluster_bits,
        };
        report.total_clusters = self.size().div_ceil(cs);
        computed.inc(report, 0, cs, "header");
        let rewrite_snapshot_table = self.check_snapshot_entries(repair, report);

        let active_l1 = self.l1.clone();
        let l1_off = self.header.l1_table_offset;
        if !active_l1.is_empty() {
            computed.inc(
                report,
                l1_off,
                active_l1.len() as u64 * 8,
                "active L1 table",
            );
        }
        let mut active_tables: HashMap<u64, Vec<u64>> = HashMap::new();
        self.walk_l1(&active_l1, true, &mut active_tables, &mut computed, report)?;

        for sn in self.snapshots.clone() {
            let bytes = u64::from(sn.l1_size) * 8;
            if sn.l1_table_offset % cs != 0 || bytes > fmt::MAX_L1_BYTES {
                report.messages.push(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                report.corruptions += 1;
                continue;
            }
            if bytes == 0 {
                continue;
            }
            let l1 = match self.read_snapshot_l1(&sn) {
                Ok(l1) => l1,
                Err(e) => {
                    report
                        .messages
                        .push(format!("ERROR snapshot {} ({}): {e}", sn.id, sn.name));
                    report.corruptions += 1;
                    continue;
                }
            };
            computed.inc(report, sn.l1_table_offset, bytes, "snapshot L1 table");
            self.walk_l1(&l1, false, &mut active_tables, &mut computed, report)?;
        }
        if self.snapshots_size > 0 {
            computed.inc(
                report,
                self.header.snapshots_offset,
                self.snapshots_size,
                "snapshot table",
            );
        }
        computed.inc(
            report,
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) * cs,
            "refcount table",
        );
        self.walk_bitmaps(&mut computed, report)?;

        // Refcount blocks: each must be aligned, inside the image and referenced exactly once.
        let mut rebuild = false;
        let mut valid_block = vec![false; self.rc.table.len()];
        for (i, &e) in self.rc.table.clone().iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                report.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                report.corruptions += 1;
                rebuild = true;
                continue;
            }
            if off / cs >= nb_clusters {
                report
                    .messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                report.corruptions += 1;
                rebuild = true;
                continue;
            }
            computed.inc(report, off, cs, "refcount block");
            let n = computed.get(off / cs);
            if n != 1 {
                report
                    .messages
                    .push(format!("ERROR refcount block {i} refcount={n}"));
                report.corruptions += 1;
                rebuild = true;
            }
            valid_block[i] = true;
        }
        // Load the valid blocks; the invalid ones read as zeros.
        self.load_refblocks_where(&valid_block)?;

        let fix_leaks = repair.is_some();
        let fix_errors = repair == Some(RepairMode::All);
        let per = self.refblock_entries();
        let order = self.header.refcount_order;
        let shift = per.trailing_zeros();
        let block_data: Vec<Option<&[u8]>> = valid_block
            .iter()
            .enumerate()
            .map(|(b, ok)| {
                if *ok {
                    self.rc.blocks[b].as_ref().map(|blk| blk.data.as_slice())
                } else {
                    None
                }
            })
            .collect();
        let disk_refcount = |c: u64| -> u64 {
            match block_data.get((c >> shift) as usize) {
                Some(Some(data)) => get_refcount(data, order, (c & (per - 1)) as usize),
                _ => 0,
            }
        };
        // Clusters to compare: the whole file, plus any cluster past it that a block counts.
        let mut beyond: Vec<u64> = Vec::new();
        for (b, ok) in valid_block.iter().enumerate() {
            let first = b as u64 * per;
            if *ok && first + per > nb_clusters {
                for c in first.max(nb_clusters)..first + per {
                    if disk_refcount(c) != 0 {
                        beyond.push(c);
                    }
                }
            }
        }
        let mut highest: Option<u64> = None;
        let mut fixes: Vec<(u64, u64)> = Vec::new();
        for c in (0..nb_clusters).chain(beyond) {
            let rc1 = disk_refcount(c);
            let rc2 = computed.get(c);
            if rc1 > 0 || rc2 > 0 {
                highest = Some(c);
            }
            if rc1 == rc2 {
                continue;
            }
            let fixable = if rc1 == 0 {
                rebuild = true;
                false
            } else {
                (rc1 > rc2 && fix_leaks) || (rc1 < rc2 && fix_errors)
            };
            report.messages.push(format!(
                "{} cluster {c} refcount={rc1} reference={rc2}",
                if fixable {
                    "Repairing"
                } else if rc1 < rc2 {
                    "ERROR"
                } else {
                    "Leaked"
                }
            ));
            if fixable {
                fixes.push((c, rc2));
                if rc1 > rc2 {
                    report.leaks_fixed += 1;
                } else {
                    report.corruptions_fixed += 1;
                }
            } else if rc1 < rc2 {
                report.corruptions += 1;
            } else {
                report.leaks += 1;
            }
        }
        report.image_end_offset = highest.map(|h| (h + 1) * cs).unwrap_or(0);
        drop(block_data);

        if rebuild && fix_errors {
            let old_blocks: Vec<u64> = valid_block
                .iter()
                .enumerate()
                .filter(|(_, ok)| **ok)
                .map(|(i, _)| self.rc.table[i] & OFFSET_MASK)
                .collect();
            self.rebuild_refcounts(&mut computed, &old_blocks, report)?;
        } else if !fixes.is_empty() {
            for (c, v) in fixes {
                let b = (c / per) as usize;
                if let Some(blk) = self.rc.blocks[b].as_mut() {
                    set_refcount(&mut blk.data, order, (c % per) as usize, v)
                        .map_err(|e| Error::format(&self.path, e))?;
                    blk.dirty = true;
                }
            }
            self.write_refblocks()?;
            self.sync()?;
        }
        self.check_copied_flags(fix_errors, &mut active_tables, report)?;
        if rewrite_snapshot_table {
            // Refcounts are right by now, so the new table's clusters are allocated safely.
            self.write_snapshot_table(self.snapshots.clone())?;
        }
        Ok(())
    }

    /// Reports v3 snapshot entries without the mandatory disk size (as `qemu-img check`
    /// does: "snapshot table entry N is incomplete"); returns whether the table must be
    /// rewritten with full extra data (repair of errors asked for).
    fn check_snapshot_entries(&self, repair: Option<RepairMode>, report: &mut CheckReport) -> bool {
        let fix = repair == Some(RepairMode::All);
        for &index in &self.incomplete_snapshot_entries {
            report.messages.push(format!(
                "{} snapshot table entry {index} is incomplete",
                if fix { "Repairing" } else { "ERROR" }
            ));
            if fix {
                report.corruptions_fixed += 1;
            } else {
                report.corruptions += 1;
            }
        }
        fix && !self.incomplete_snapshot_entries.is_empty()
    }

    /// Walks one L1 table's L2 tables, counting references (and statistics for the active one).
    fn walk_l1(
        &mut self,
        l1: &[u64],
        active: bool,
        seen: &mut HashMap<u64, Vec<u64>>,
        computed: &mut Computed,
        report: &mut CheckReport,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let (cluster_bits, version) = (self.header.cluster_bits, self.header.version);
        let mut buf = vec![0u8; cs as usize];
        let mut scratch: Vec<u64> = Vec::with_capacity((cs / 8) as usize);
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if l2_off % cs != 0 {
                report.messages.push(format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                report.corruptions += 1;
                continue;
            }
            if l2_off + cs > self.file_len {
                report.messages.push(format!(
                    "ERROR l2_offset={l2_off:x}: L2 table of L1 entry {i} is past the end of the image"
                ));
                report.corruptions += 1;
                continue;
            }
            computed.inc(report, l2_off, cs, "L2 table");
            // Contiguity is judged within one L2 table, as qemu-img does.
            let mut next_contiguous: Option<u64> = None;
            // Cached tables may hold unwritten changes; others are read once and kept for
            // reuse by the other L1 tables that share them (up to a memory bound).
            if !self.l2.contains_key(&l2_off) && !seen.contains_key(&l2_off) {
                self.pread(l2_off, &mut buf, "L2 table")?;
                scratch.clear();
                scratch.extend(
                    buf.chunks_exact(8).map(|c| {
                        u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                    }),
                );
                if active || (seen.len() as u64 + 1) * cs <= CHECK_TABLE_CACHE_BYTES {
                    seen.insert(l2_off, std::mem::take(&mut scratch));
                }
            }
            let entries: &[u64] = match self.l2.get(&l2_off) {
                Some(t) => &t.entries,
                None => seen.get(&l2_off).map_or(&scratch[..], |t| &t[..]),
            };
            for &raw in entries {
                if raw == 0 {
                    continue;
                }
                // Fast path: a plain allocated cluster.
                if raw & (OFLAG_COMPRESSED | OFLAG_ZERO) == 0 {
                    let host = raw & OFFSET_MASK;
                    if host != 0 && host & (cs - 1) == 0 {
                        if active {
                            report.allocated_clusters += 1;
                            if next_contiguous.is_some_and(|n| n != host) {
                                report.fragmented_clusters += 1;
                            }
                            next_contiguous = Some(host + cs);
                        }
                        computed.inc_cluster(report, host, "data cluster");
                        continue;
                    }
                }
                if raw & OFLAG_COMPRESSED != 0 && raw & OFLAG_COPIED != 0 {
                    report.messages.push(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        raw & !(OFLAG_COPIED | OFLAG_COMPRESSED)
                    ));
                    report.corruptions += 1;
                }
                let entry = match fmt::decode_l2_entry(raw, cluster_bits, version) {
                    Ok(x) => x,
                    Err(_) => {
                        report.messages.push(format!(
                            "ERROR offset={:x}: Cluster is not properly aligned; L2 entry corrupted",
                            raw & OFFSET_MASK
                        ));
                        report.corruptions += 1;
                        continue;
                    }
                };
                match entry {
                    L2Entry::Compressed { host, len } => {
                        if active {
                            report.allocated_clusters += 1;
                            report.compressed_clusters += 1;
                            report.fragmented_clusters += 1;
                        }
                        computed.inc(report, host, len, "compressed cluster");
                    }
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => {
                        if active {
                            report.allocated_clusters += 1;
                            if next_contiguous.is_some_and(|n| n != host) {
                                report.fragmented_clusters += 1;
                            }
                            next_contiguous = Some(host + cs);
                        }
                        computed.inc(report, host, cs, "data cluster");
                    }
                    L2Entry::Zero { host: None, .. } | L2Entry::Unallocated => {}
                }
            }
        }
        Ok(())
    }

    /// Counts clusters of persistent dirty bitmaps while the bitmaps extension is valid.
    fn walk_bitmaps(&mut self, computed: &mut Computed, report: &mut CheckReport) -> Result<()> {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let ext = match self.header.extension(EXT_BITMAPS) {
            Some(d) if d.len() >= 24 => d.to_vec(),
            _ => return Ok(()),
        };
        let be32 = |b: &[u8], o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let be64 = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(a)
        };
        let nb = be32(&ext, 0);
        let dir_size = be64(&ext, 8);
        let dir_off = be64(&ext, 16);
        if dir_size > 64 << 20
            || dir_off
                .checked_add(dir_size)
                .map_or(true, |e| e > self.file_len)
        {
            report
                .messages
                .push("ERROR bitmap directory is outside the image".into());
            report.corruptions += 1;
            return Ok(());
        }
        computed.inc(report, dir_off, dir_size, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        self.pread(dir_off, &mut dir, "bitmap directory")?;
        let mut pos = 0usize;
        for _ in 0..nb {
            if pos + 24 > dir.len() {
                report
                    .messages
                    .push("ERROR bitmap directory is truncated".into());
                report.corruptions += 1;
                break;
            }
            let table_off = be64(&dir, pos);
            let table_size = u64::from(be32(&dir, pos + 8));
            let name_size = usize::from(u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]));
            let extra = be32(&dir, pos + 20) as usize;
            pos = fmt::align_up((pos + 24 + extra + name_size) as u64, 8) as usize;
            if table_off
                .checked_add(table_size * 8)
                .map_or(true, |e| e > self.file_len)
            {
                report.messages.push(format!(
                    "ERROR bitmap table at {table_off:#x} is outside the image"
                ));
                report.corruptions += 1;
                continue;
            }
            if table_size == 0 {
                continue;
            }
            computed.inc(report, table_off, table_size * 8, "bitmap table");
            let mut table = vec![0u8; (table_size * 8) as usize];
            self.pread(table_off, &mut table, "bitmap table")?;
            for e in fmt::decode_u64_table(&table) {
                let off = e & OFFSET_MASK;
                if off != 0 {
                    computed.inc(report, off, 0, "bitmap data cluster");
                }
            }
        }
        Ok(())
    }

    /// Writes fresh refcount blocks and table at the end of the image from the computed counts.
    ///
    /// Used when the refcount structures themselves are broken; the old structures are
    /// freed by the new counts.
    fn rebuild_refcounts(
        &mut self,
        computed: &mut Computed,
        old_blocks: &[u64],
        report: &mut CheckReport,
    ) -> Result<()> {
        let cs = self.cluster_size();
        // The old table and blocks stop being referenced once the header points to the new ones.
        let old_table = self.header.refcount_table_offset / cs;
        let old_table_end = old_table + u64::from(self.header.refcount_table_clusters);
        for c in (old_table..old_table_end).chain(old_blocks.iter().map(|o| o / cs)) {
            if let Some(n) = computed.counts.get_mut(c as usize) {
                *n = n.saturating_sub(1);
            }
        }
        let per = self.refblock_entries();
        let order = self.header.refcount_order;
        let used_end = computed
            .counts
            .iter()
            .rposition(|&n| n != 0)
            .map(|p| p as u64 + 1)
            .unwrap_or(1);
        let end = used_end.max(self.file_len.div_ceil(cs));
        let mut blocks = 0u64;
        let table_clusters = loop {
            let table_clusters = (blocks * 8).div_ceil(cs).max(1);
            let total = end + blocks + table_clusters;
            let need = total.div_ceil(per);
            if need == blocks {
                break table_clusters;
            }
            blocks = need;
        };
        if table_clusters * cs > fmt::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                &self.path,
                "rebuilt refcount table would be too large",
            ));
        }
        let total = end + blocks + table_clusters;
        computed.counts.resize(total as usize, 0);
        for c in end..total {
            computed.counts[c as usize] = 1;
        }
        let max = fmt::max_refcount(order);
        let mut area = vec![0u8; (blocks * cs) as usize];
        for (c, &n) in computed.counts.iter().enumerate() {
            let b = c as u64 / per;
            let blk = &mut area[(b * cs) as usize..((b + 1) * cs) as usize];
            set_refcount(blk, order, (c as u64 % per) as usize, u64::from(n).min(max))
                .map_err(|e| Error::format(&self.path, e))?;
        }
        let mut table: Vec<u64> = (0..blocks).map(|b| (end + b) * cs).collect();
        table.resize((table_clusters * cs / 8) as usize, 0);
        self.pwrite(end * cs, &area, "refcount block")?;
        self.pwrite(
            (end + blocks) * cs,
            &fmt::encode_u64_table(&table),
            "refcount table",
        )?;
        self.sync()?;
        self.header.refcount_table_offset = (end + blocks) * cs;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.write_header_fields()?;
        self.sync()?;
        report.messages.push(format!(
            "Rebuilding refcount structure: {blocks} refcount blocks and a {table_clusters}-cluster table at {:#x}",
            end * cs
        ));
        report.corruptions_fixed += report.corruptions;
        report.corruptions = 0;
        report.leaks_fixed += report.leaks;
        report.leaks = 0;
        self.discard_unwritten()?;
        Ok(())
    }

    /// Checks (and with `fix`, repairs) COPIED flags of the active tables against refcounts.
    fn check_copied_flags(
        &mut self,
        fix: bool,
        tables: &mut HashMap<u64, Vec<u64>>,
        report: &mut CheckReport,
    ) -> Result<()> {
        let cs = self.cluster_size();
        // Refcounts as they are on disk now (after any repair), from every readable block.
        let valid: Vec<bool> = self
            .rc
            .table
            .iter()
            .map(|&e| {
                let off = e & OFFSET_MASK;
                off != 0 && off % cs == 0 && off + cs <= self.file_len
            })
            .collect();
        self.load_refblocks_where(&valid)?;
        let per = self.refblock_entries();
        let shift = per.trailing_zeros();
        let order = self.header.refcount_order;
        let disk_refcount = |img: &Qcow2Image, c: u64| -> u64 {
            let b = (c >> shift) as usize;
            match img.rc.blocks.get(b) {
                Some(Some(blk)) if valid[b] => {
                    get_refcount(&blk.data, order, (c & (per - 1)) as usize)
                }
                _ => 0,
            }
        };
        let mut fixes: Vec<CopiedFix> = Vec::new();
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 || l2_off % cs != 0 || l2_off + cs > self.file_len {
                continue;
            }
            let rc = disk_refcount(self, l2_off / cs);
            let mut new_l1 = None;
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                report.messages.push(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if fix {
                    new_l1 = Some(if rc == 1 {
                        l2_off | OFLAG_COPIED
                    } else {
                        l2_off
                    });
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
            }
            if !self.l2.contains_key(&l2_off) && !tables.contains_key(&l2_off) {
                let mut buf = vec![0u8; cs as usize];
                self.pread(l2_off, &mut buf, "L2 table")?;
                tables.insert(l2_off, fmt::decode_u64_table(&buf));
            }
            let entries: &[u64] = match self.l2.get(&l2_off) {
                Some(t) => &t.entries,
                None => &tables[&l2_off],
            };
            let mut entry_fixes = Vec::new();
            for (j, &raw) in entries.iter().enumerate() {
                if raw & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let host = raw & OFFSET_MASK;
                if host == 0 || host % cs != 0 {
                    continue;
                }
                let rc = disk_refcount(self, host / cs);
                if (rc == 1) != (raw & OFLAG_COPIED != 0) {
                    report.messages.push(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    if fix {
                        let new = if rc == 1 {
                            raw | OFLAG_COPIED
                        } else {
                            raw & !OFLAG_COPIED
                        };
                        entry_fixes.push((j, new));
                        report.corruptions_fixed += 1;
                    } else {
                        report.corruptions += 1;
                    }
                }
            }
            if new_l1.is_some() || !entry_fixes.is_empty() {
                fixes.push((i, new_l1.unwrap_or(e), entry_fixes));
            }
        }
        if fixes.is_empty() {
            return Ok(());
        }
        for (i, l1_entry, entry_fixes) in fixes {
            let l2_off = l1_entry & OFFSET_MASK;
            if self.l1[i] != l1_entry {
                self.l1[i] = l1_entry;
                self.l1_dirty = true;
            }
            if !entry_fixes.is_empty() {
                self.load_l2(l2_off)?;
                for (j, value) in entry_fixes {
                    self.set_l2_entry(l2_off, j, value);
                }
            }
        }
        self.write_tables()?;
        self.sync()
    }

    /// Loads (coalescing reads) the refcount blocks whose `wanted` flag is set.
    fn load_refblocks_where(&mut self, wanted: &[bool]) -> Result<()> {
        let cs = self.cluster_size();
        let mut want: Vec<(u64, usize)> = wanted
            .iter()
            .enumerate()
            .filter(|(i, ok)| **ok && self.rc.blocks[*i].is_none())
            .map(|(i, _)| (self.rc.table[i] & OFFSET_MASK, i))
            .collect();
        want.sort_unstable();
        let mut k = 0;
        while k < want.len() {
            let start = want[k].0;
            let mut j = k + 1;
            while j < want.len() && want[j].0 == want[j - 1].0 + cs && j - k < 4096 {
                j += 1;
            }
            let mut buf = vec![0u8; (j - k) * cs as usize];
            self.pread(start, &mut buf, "refcount block")?;
            for (n, chunk) in buf.chunks_exact(cs as usize).enumerate() {
                self.rc.blocks[want[k + n].1] = Some(RefBlock {
                    data: chunk.to_vec(),
                    dirty: false,
                });
            }
            k = j;
        }
        Ok(())
    }
}
