//! Internal snapshots: create, delete and apply, in QEMU's order of writes.
//!
//! Every operation first makes the image's cached state durable, then moves
//! from one consistent on-disk state to the next with a sync between steps:
//! refcounts go up before a new reference is written, references go away
//! before refcounts go down. A crash between any two steps leaves at worst
//! leaked clusters (and, as with QEMU, stale COPIED flags that only cost
//! extra copies), never a snapshot that reads wrong.

use std::time::{SystemTime, UNIX_EPOCH};

use vmsnap_qcow2_format::{
    self as fmt, SnapshotEntry, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
};

use crate::error::{Error, Result};
use crate::image::{MetaKind, Qcow2Image, SnapshotInfo};
use vmsnap_qcow2_format::L2Entry;

impl Qcow2Image {
    /// Index of the snapshot with this id, else with this name (QEMU's lookup order).
    pub(crate) fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }

    fn snapshot_not_found(&self, id_or_name: &str) -> Error {
        Error::NotFound {
            path: self.path.clone(),
            what: format!("snapshot '{id_or_name}'"),
        }
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// Creates a disk-only internal snapshot of the current state, as `qemu-img snapshot -c`.
    ///
    /// The id is the largest numeric id plus one; the date is the wall clock.
    pub fn create_snapshot(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.require_writable()?;
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::invalid(
                &self.path,
                "snapshot name must be 1 to 65535 bytes long",
            ));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::AlreadyExists {
                path: self.path.clone(),
                what: format!("snapshot '{name}'"),
            });
        }
        if self.snapshots.len() >= fmt::MAX_SNAPSHOTS as usize {
            return Err(Error::unsupported(
                &self.path,
                "the image already has 65536 snapshots",
            ));
        }
        self.flush()?;
        let next_id = self
            .snapshots
            .iter()
            .map(|s| leading_number(&s.id))
            .max()
            .unwrap_or(0)
            + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let entry = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: self.l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // qemu-img takes the time in microseconds.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: Some(0),
            unknown_extra: Vec::new(),
        };
        let result = self.create_snapshot_steps(entry);
        if result.is_err() {
            let _ = self.discard_unwritten();
        }
        let entry = result?;
        Ok(self
            .snapshots()
            .into_iter()
            .find(|s| s.id == entry.id)
            .unwrap_or(SnapshotInfo {
                id: entry.id,
                name: entry.name,
                vm_state_size: 0,
                date_sec: entry.date_sec,
                date_nsec: entry.date_nsec,
                vm_clock_nsec: 0,
                icount: entry.icount,
                disk_size: self.size(),
            }))
    }

    fn create_snapshot_steps(&mut self, mut entry: SnapshotEntry) -> Result<SnapshotEntry> {
        let cs = self.cluster_size();
        // Everything is decided in memory first, so a refusal (data mapped onto metadata,
        // refcount overflow) writes nothing, not even a cluster past the end of the file.
        let active = self.l1.clone();
        // The +1 pass below refuses clusters with refcount 0 itself, before any write.
        self.validate_tree(&active, "the active L1 table", false)?;
        self.require_allocated_table(
            self.header.snapshots_offset,
            self.snapshots_size,
            "snapshot table",
        )?;
        self.tree_refcount_pass(&active, 1)?;
        // 1. New clusters for the L1 copy and the new snapshot table, all refcounts raised,
        //    then written and synced before anything on disk points at them.
        let l1_copy: Vec<u64> = self.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        let l1_bytes = fmt::encode_u64_table(&l1_copy);
        if !l1_bytes.is_empty() {
            let off = self.alloc_clusters((l1_bytes.len() as u64).div_ceil(cs))?;
            self.mark_metadata(off, l1_bytes.len() as u64);
            entry.l1_table_offset = off;
        }
        let mut list = self.snapshots.clone();
        list.push(entry.clone());
        let (table_off, table) = self.prepare_snapshot_table(&list)?;
        if !l1_bytes.is_empty() {
            self.pwrite(entry.l1_table_offset, &l1_bytes, "snapshot L1 table")?;
        }
        if !table.is_empty() {
            self.pwrite(table_off, &table, "snapshot table")?;
        }
        let table_len = table.len() as u64;
        self.write_refblocks()?;
        self.sync()?;
        // 2. Shared clusters are no longer COPIED: later guest writes copy them.
        self.update_active_copied_flags()?;
        self.write_tables()?;
        self.sync()?;
        // 3. The header switches to the new table; the old table is freed after.
        self.commit_snapshot_table(list, table_off, table_len)?;
        Ok(entry)
    }

    /// Deletes an internal snapshot and frees what only it used, as `qemu-img snapshot -d`.
    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.require_writable()?;
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| self.snapshot_not_found(id_or_name))?;
        self.flush()?;
        let sn = self.snapshots[index].clone();
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        self.validate_tree(&sn_l1, &format!("snapshot '{}'", sn.name), true)?;
        self.require_allocated_table(
            self.header.snapshots_offset,
            self.snapshots_size,
            "snapshot table",
        )?;
        self.require_allocated_table(
            sn.l1_table_offset,
            u64::from(sn.l1_size) * 8,
            &format!("L1 table of snapshot '{}'", sn.name),
        )?;
        self.freed_clusters = Some(Vec::new());
        let result = (|| -> Result<()> {
            // 1. The table no longer lists the snapshot: from here on a crash only leaks.
            let mut list = self.snapshots.clone();
            list.remove(index);
            self.write_snapshot_table(list)?;
            // 2. Its references go away.
            self.tree_refcount_pass(&sn_l1, -1)?;
            if sn.l1_size > 0 {
                self.add_refcount(sn.l1_table_offset, u64::from(sn.l1_size) * 8, -1)?;
            }
            self.write_refblocks()?;
            self.sync()?;
            // What only the snapshot used goes back to the file system, as with
            // `qemu-img snapshot -d` (the refcounts saying so are on disk now).
            self.punch_freed_clusters();
            // 3. Clusters now used only by the active state may be written in place again.
            self.update_active_copied_flags()?;
            self.write_tables()?;
            self.sync()
        })();
        self.freed_clusters = None;
        if result.is_err() {
            let _ = self.discard_unwritten();
        }
        result
    }

    /// Reverts the active state to a snapshot, as `qemu-img snapshot -a`.
    ///
    /// The virtual size becomes the snapshot's; the active L1 table grows if the snapshot's is larger.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.require_writable()?;
        let index = self
            .find_snapshot(id_or_name)
            .ok_or_else(|| self.snapshot_not_found(id_or_name))?;
        self.flush()?;
        let sn = self.snapshots[index].clone();
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let disk_size = sn.disk_size.unwrap_or(self.size());
        // Both trees change refcounts: refuse before anything is written if either maps
        // data onto metadata.
        // The snapshot's tree gains references (that pass refuses refcount 0 itself, before
        // any write); the active tree loses them after the switch, so it is checked here.
        self.validate_tree(&sn_l1, &format!("snapshot '{}'", sn.name), false)?;
        let active = self.l1.clone();
        self.validate_tree(&active, "the active L1 table", true)?;
        self.require_allocated_table(
            self.header.l1_table_offset,
            u64::from(self.header.l1_size) * 8,
            "active L1 table",
        )?;
        let result = (|| -> Result<()> {
            // 1. Everything the snapshot uses gains a reference first (in memory, so that
            //    a refcount overflow is refused before anything is written).
            self.tree_refcount_pass(&sn_l1, 1)?;
            self.before_guest_change()?;
            // 2. The active L1 table must hold the whole snapshot table (and its disk size).
            let need = u64::from(sn.l1_size).max(self.header.l1_entries_for(disk_size));
            self.grow_l1(need)?;
            self.write_refblocks()?;
            self.sync()?;
            self.update_active_copied_flags()?;
            self.write_tables()?;
            self.sync()?;
            // 3. The active L1 table becomes the snapshot's (no COPIED flags: all shared now).
            let mut new_l1: Vec<u64> = sn_l1.iter().map(|e| e & !OFLAG_COPIED).collect();
            new_l1.resize(self.l1.len(), 0);
            let old_l1 = std::mem::replace(&mut self.l1, new_l1);
            self.l1_dirty = true;
            if self.header.size != disk_size {
                self.header.size = disk_size;
                self.header_dirty = true;
            }
            self.write_tables()?;
            self.sync()?;
            // 4. The old active tree loses its references; what only it used
            //    goes back to the file system, as with `qemu-img snapshot -a`.
            self.freed_clusters = Some(Vec::new());
            self.tree_refcount_pass(&old_l1, -1)?;
            self.write_refblocks()?;
            self.sync()?;
            self.punch_freed_clusters();
            // 5. COPIED flags for what the active state alone now uses.
            self.update_active_copied_flags()?;
            self.write_tables()?;
            self.sync()
        })();
        self.freed_clusters = None;
        if result.is_err() {
            let _ = self.discard_unwritten();
        }
        result
    }

    /// Reads and validates a snapshot's L1 table.
    pub(crate) fn read_snapshot_l1(&self, sn: &SnapshotEntry) -> Result<Vec<u64>> {
        let cs = self.cluster_size();
        let bytes = u64::from(sn.l1_size) * 8;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        if sn.l1_table_offset % cs != 0 || bytes > fmt::MAX_L1_BYTES {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "snapshot '{}' has an invalid L1 table (offset {:#x}, {} entries)",
                    sn.name, sn.l1_table_offset, sn.l1_size
                ),
            ));
        }
        let mut buf = vec![0u8; bytes as usize];
        self.pread(sn.l1_table_offset, &mut buf, "snapshot L1 table")?;
        Ok(fmt::decode_u64_table(&buf))
    }

    /// Refuses a tree (an L1 table and its L2 tables) that puts an L2 table or guest data
    /// on other metadata (header, L1 tables, refcount table and blocks, snapshot table, or,
    /// for data, an active L2 table), or that references a cluster whose refcount is 0.
    /// Changing refcounts through such a tree would free or share metadata, or leave a
    /// snapshot's data writable in place; writing through it would overwrite metadata.
    /// Reads only, so the operation that asks is refused before it writes anything. The
    /// refcount test is skipped with `!check_refcounts` (a tree about to gain references,
    /// whose in-memory +1 pass refuses refcount 0 on its own).
    pub(crate) fn validate_tree(
        &mut self,
        l1: &[u64],
        tree: &str,
        check_refcounts: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let l2_entries = self.header.l2_entries();
        let ranges = self.metadata_ranges()?;
        self.load_all_refblocks()?;
        let l2_offsets: Vec<u64> = l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        self.prefetch_l2(&l2_offsets)?;
        let mut cursor = 0usize;
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2_off = l1_entry & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let guest_base = i as u64 * l2_entries * cs;
            if let Some(r) = overlapping(&ranges, l2_off, l2_off + cs) {
                if r.2 != MetaKind::ActiveL2 {
                    return Err(Error::corrupt(
                        &self.path,
                        format!(
                            "{tree} has the L2 table for guest offset {guest_base:#x} in the {}; refusing to change the image",
                            self.describe_metadata(l2_off)
                        ),
                    ));
                }
            }
            if check_refcounts {
                self.require_referenced(l2_off, guest_base, tree)?;
            }
            let Some(table) = self.l2.get(&l2_off) else {
                continue;
            };
            for (j, &raw) in table.entries.iter().enumerate() {
                // Plain and zero entries name one host cluster (0: none); compressed ones a byte range.
                let (start, end) = if raw & OFLAG_COMPRESSED == 0 {
                    let host = raw & OFFSET_MASK & !(cs - 1);
                    if host == 0 {
                        continue;
                    }
                    (host, host + cs)
                } else {
                    let Some((host, len)) = self.decode_entry(raw)?.host_range() else {
                        continue;
                    };
                    let start = host / cs * cs;
                    (start, fmt::align_up(host.saturating_add(len.max(1)), cs))
                };
                let guest = guest_base + j as u64 * cs;
                cursor = seek_range(&ranges, cursor, start);
                if let Some(r) = ranges.get(cursor).filter(|r| r.0 < end) {
                    let at = r.0.max(start);
                    return Err(Error::corrupt(
                        &self.path,
                        format!(
                            "{tree} maps guest offset {guest:#x} onto the {}; refusing to change the image",
                            self.describe_metadata(at)
                        ),
                    ));
                }
                let mut cluster = start;
                while check_refcounts && cluster < end {
                    self.require_referenced(cluster, guest, tree)?;
                    cluster += cs;
                }
            }
        }
        Ok(())
    }

    /// Refuses a table (snapshot table, an L1 table) an operation will free whose clusters
    /// have refcount 0: freeing it would fail half-way through the operation.
    fn require_allocated_table(&mut self, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.load_all_refblocks()?;
        let cs = self.cluster_size();
        let mut cluster = offset / cs * cs;
        while cluster < offset.saturating_add(len) {
            if self
                .cached_refcount(cluster / cs)
                .map_or(true, |rc| rc == 0)
            {
                return Err(Error::corrupt(
                    &self.path,
                    format!(
                        "the {what} at {offset:#x} has refcount 0 at {cluster:#x}; repair the image with `check -r all` first"
                    ),
                ));
            }
            cluster += cs;
        }
        Ok(())
    }

    /// Refuses a cluster a tree references while its refcount is 0 (the refcount is wrong).
    ///
    /// Every refcount block must be in memory (a cluster without one counts 0).
    #[inline]
    fn require_referenced(&self, cluster: u64, guest: u64, tree: &str) -> Result<()> {
        if self
            .cached_refcount(cluster / self.cluster_size())
            .is_some_and(|rc| rc != 0)
        {
            return Ok(());
        }
        let detail = if cluster >= self.file_len {
            format!(
                "{tree} maps guest offset {guest:#x} to {cluster:#x}, past the end of the file; refusing to change the image"
            )
        } else {
            format!(
                "{tree} uses the cluster at {cluster:#x} (guest offset {guest:#x}) but its refcount is 0; repair the image with `check -r all` first"
            )
        };
        Err(Error::corrupt(&self.path, detail))
    }

    /// Adds `delta` (+1/-1) to the refcount of every L2 table and data cluster reachable from `l1`.
    pub(crate) fn tree_refcount_pass(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let l2_offsets: Vec<u64> = l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        self.load_all_refblocks()?;
        self.prefetch_l2(&l2_offsets)?;
        for off in l2_offsets {
            self.load_l2(off)?;
            let table = match self.l2.remove(&off) {
                Some(t) => t,
                None => continue,
            };
            let mut result = Ok(());
            for &raw in &table.entries {
                if raw == 0 {
                    continue;
                }
                let entry = match self.decode_entry(raw) {
                    Ok(e) => e,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                if let Some((host, len)) = entry.host_range() {
                    if let Err(e) = self.add_refcount(host, len, delta) {
                        result = Err(e);
                        break;
                    }
                }
            }
            self.l2.insert(off, table);
            result?;
            self.add_refcount(off, 0, delta)?;
        }
        Ok(())
    }

    /// Punches holes where clusters were freed since tracking began (QEMU's
    /// discard of freed clusters), so freed snapshot data stops occupying the
    /// file system. Call only once the zero refcounts are on disk; a cluster
    /// allocated again since is skipped. Best effort: a file system without
    /// hole punching keeps the space, which the image reuses for its next
    /// allocations.
    fn punch_freed_clusters(&mut self) {
        let mut clusters = self.freed_clusters.replace(Vec::new()).unwrap_or_default();
        clusters.sort_unstable();
        clusters.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in clusters {
            if c == 0 || self.cached_refcount(c) != Some(0) {
                continue;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == c => *count += 1,
                _ => runs.push((c, 1)),
            }
        }
        let cs = self.cluster_size();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        for (first, count) in runs {
            // SAFETY: fallocate(2) on a descriptor this image owns; no memory is passed.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (first * cs) as libc::off_t,
                    (count * cs) as libc::off_t,
                );
            }
        }
    }

    /// Sets COPIED on active L1/L2 entries whose cluster has refcount 1 and clears it elsewhere.
    pub(crate) fn update_active_copied_flags(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let offsets: Vec<u64> = self
            .l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        self.prefetch_l2(&offsets)?;
        self.load_all_refblocks()?;
        for i in 0..self.l1.len() {
            let raw = self.l1[i];
            let off = raw & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let want = if self.refcount(off / cs)? == 1 {
                off | OFLAG_COPIED
            } else {
                off
            };
            if raw != want {
                self.l1[i] = want;
                self.l1_dirty = true;
            }
            self.load_l2(off)?;
            let mut table = match self.l2.remove(&off) {
                Some(t) => t,
                None => continue,
            };
            let mut result = Ok(());
            for e in table.entries.iter_mut() {
                if *e == 0 {
                    continue;
                }
                let entry = match self.decode_entry(*e) {
                    Ok(x) => x,
                    Err(err) => {
                        result = Err(err);
                        break;
                    }
                };
                let host = match entry {
                    L2Entry::Normal { host, .. }
                    | L2Entry::Zero {
                        host: Some(host), ..
                    } => host,
                    _ => continue,
                };
                let rc = match self.cached_refcount(host / cs) {
                    Some(rc) => rc,
                    None => match self.refcount(host / cs) {
                        Ok(rc) => rc,
                        Err(err) => {
                            result = Err(err);
                            break;
                        }
                    },
                };
                let new = if rc == 1 {
                    *e | OFLAG_COPIED
                } else {
                    *e & !OFLAG_COPIED
                };
                if new != *e {
                    *e = new;
                    table.dirty = true;
                }
            }
            self.l2.insert(off, table);
            result?;
        }
        Ok(())
    }

    /// Writes `list` as the new snapshot table, switches the header to it, frees the old one.
    ///
    /// Same steps as QEMU: allocate and write the table, sync, update the header's count
    /// and offset, sync, then free the old table.
    pub(crate) fn write_snapshot_table(&mut self, list: Vec<SnapshotEntry>) -> Result<()> {
        let (off, table) = self.prepare_snapshot_table(&list)?;
        if !table.is_empty() {
            self.pwrite(off, &table, "snapshot table")?;
        }
        self.write_refblocks()?;
        self.sync()?;
        self.commit_snapshot_table(list, off, table.len() as u64)
    }

    /// Encodes `list` and allocates clusters for it; the caller writes it there.
    fn prepare_snapshot_table(&mut self, list: &[SnapshotEntry]) -> Result<(u64, Vec<u8>)> {
        let cs = self.cluster_size();
        let bytes = fmt::encode_snapshot_table(list).map_err(|e| Error::format(&self.path, e))?;
        if bytes.is_empty() {
            return Ok((0, bytes));
        }
        let off = self.alloc_clusters((bytes.len() as u64).div_ceil(cs))?;
        self.mark_metadata(off, bytes.len() as u64);
        Ok((off, bytes))
    }

    /// Points the header at a prepared (and synced) table, syncs, then frees the old table.
    fn commit_snapshot_table(
        &mut self,
        list: Vec<SnapshotEntry>,
        off: u64,
        len: u64,
    ) -> Result<()> {
        let old_off = self.header.snapshots_offset;
        let old_size = self.snapshots_size;
        self.header.nb_snapshots = list.len() as u32;
        self.header.snapshots_offset = off;
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&self.header.nb_snapshots.to_be_bytes());
        fields[4..].copy_from_slice(&off.to_be_bytes());
        self.pwrite(60, &fields, "header")?;
        self.sync()?;
        self.snapshots = list;
        self.snapshots_size = len;
        // Every entry we write carries QEMU 7.2's full extra data.
        self.incomplete_snapshot_entries.clear();
        if old_size > 0 && old_off != 0 {
            self.add_refcount(old_off, old_size, -1)?;
            self.write_frees()?;
        }
        Ok(())
    }
}

/// The first of the sorted, disjoint `ranges` that overlaps `[start, end)`.
fn overlapping(
    ranges: &[(u64, u64, MetaKind)],
    start: u64,
    end: u64,
) -> Option<&(u64, u64, MetaKind)> {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges.get(i).filter(|r| r.0 < end)
}

/// Index of the first of the sorted, disjoint `ranges` ending after `start`.
///
/// `hint` is the previous answer: host offsets in an L2 table mostly ascend, so the
/// answer is usually `hint` or the next one, and a binary search is the fallback.
#[inline]
fn seek_range(ranges: &[(u64, u64, MetaKind)], hint: usize, start: u64) -> usize {
    let ends_after = |i: usize| ranges.get(i).map_or(true, |r| r.1 > start);
    let ends_before = |i: usize| i == 0 || ranges.get(i - 1).is_some_and(|r| r.1 <= start);
    if ends_after(hint) && ends_before(hint) {
        hint
    } else if hint < ranges.len() && ranges[hint].1 <= start && ends_after(hint + 1) {
        hint + 1
    } else {
        ranges.partition_point(|r| r.1 <= start)
    }
}

/// The number at the start of an id, as C's strtoul reads it (0 if none).
fn leading_number(id: &str) -> u64 {
    let digits: String = id
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX - 1 })
}

#[cfg(test)]
mod tests {
    use super::leading_number;
    use crate::*;

    fn allocated(path: &std::path::Path) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
    }

    /// Deleting a snapshot, or applying one over data only the active state
    /// used, gives the freed clusters back to the file system (holes), as
    /// `qemu-img snapshot -d` / `-a` do.
    #[test]
    fn delete_and_apply_give_freed_clusters_back() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        create(
            &path,
            ImageFormat::Qcow2,
            &CreateOptions {
                size: 32 * MIB,
                cluster_size: 65536,
                compat: Compat::V3,
                refcount_bits: 16,
                backing: None,
            },
        )
        .unwrap();
        let rw = OpenOptions {
            writable: true,
            backing: BackingPolicy::FromHeader,
        };
        let mut img = Qcow2Image::open(&path, rw.clone()).unwrap();
        img.write_at(0, &vec![1u8; 16 * MIB as usize]).unwrap();
        img.create_snapshot("old").unwrap();
        img.write_at(0, &vec![2u8; 16 * MIB as usize]).unwrap();
        img.flush().unwrap();
        let both = allocated(&path);
        img.delete_snapshot("old").unwrap();
        let one = allocated(&path);
        assert!(one + 15 * MIB < both, "delete: {both} -> {one} bytes");
        img.create_snapshot("keep").unwrap();
        img.write_at(0, &vec![3u8; 16 * MIB as usize]).unwrap();
        img.flush().unwrap();
        let diverged = allocated(&path);
        img.apply_snapshot("keep").unwrap();
        let applied = allocated(&path);
        assert!(
            applied + 15 * MIB < diverged,
            "apply: {diverged} -> {applied} bytes"
        );
        let mut back = vec![0u8; 16 * MIB as usize];
        img.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 2));
        drop(img);
        let check = std::process::Command::new("qemu-img")
            .args(["check", path.to_str().unwrap()])
            .output()
            .expect("qemu-img is installed");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    #[test]
    fn ids_follow_strtoul() {
        assert_eq!(leading_number("12"), 12);
        assert_eq!(leading_number("7abc"), 7);
        assert_eq!(leading_number("abc"), 0);
        assert_eq!(leading_number(""), 0);
    }
}
