//! Snapshot tables in the domain store (component `snapshots`): snapshot
//! records (snapmeta's metadata as JSON next to vmsnap's storage record), the
//! current snapshot per domain, the files vmsnap created, and the intent
//! journal. The current image chains are the domain layer's `disk_layers`.
//! Every change that must be seen as one (a snapshot appearing, the chains
//! switching, its journal entry closing) goes through one SQL transaction, so
//! a crash leaves either all of it or none (DESIGN §5.4).

use std::path::PathBuf;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::error::{Result, SnapshotError};
use super::model::SnapshotStorage;
use super::ops::RevertMode;
use crate::disk::DiskChain;
use crate::snapshot::meta::SnapshotMeta;
use crate::store::{sql, Migration, Store};

/// Component name of the snapshot tables in `schema_version`.
pub const SNAPSHOT_COMPONENT: &str = "snapshots";

/// The snapshot tables' migrations.
pub const SNAPSHOT_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "
        CREATE TABLE snapshots (
            domain  TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            name    TEXT NOT NULL,
            seq     INTEGER NOT NULL,   -- creation order
            meta    TEXT NOT NULL,      -- snapmeta's SnapshotMeta as JSON
            storage TEXT NOT NULL,      -- the image chains it needs, as JSON
            PRIMARY KEY (domain, name)
        );
        CREATE TABLE snapshot_current (
            domain TEXT PRIMARY KEY REFERENCES domains(name) ON DELETE CASCADE,
            name   TEXT NOT NULL
        );
        CREATE TABLE snapshot_owned_files (
            domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            path   TEXT NOT NULL,
            PRIMARY KEY (domain, path)
        );
        CREATE TABLE snapshot_journal (
            id     INTEGER PRIMARY KEY AUTOINCREMENT,
            domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            intent TEXT NOT NULL        -- Intent as JSON
        );
    ",
}];

/// Free space a journaled operation wants next to the store before it
/// starts: its steps and commit write a few dozen KiB of log (about 33 KiB
/// for an internal snapshot) plus the 32 KiB shared-memory index, so this
/// leaves several times that, and refusing up front beats failing after the
/// images changed.
pub const OPERATION_HEADROOM: u64 = 256 * 1024;

/// One stored snapshot.
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    /// The snapshot's name, unique within its domain.
    pub name: String,
    /// Creation order, so listings without a tree are stable.
    pub seq: i64,
    /// The user-facing metadata (`is_current` filled from the current pointer).
    pub meta: SnapshotMeta,
    /// What revert and delete act on.
    pub storage: SnapshotStorage,
}

/// The multi-step operations the journal covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// snapshot-create-as / snapshot-create.
    Create,
    /// snapshot-revert.
    Revert,
    /// snapshot-delete.
    Delete,
}

impl Operation {
    /// The command's verb for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Revert => "revert",
            Operation::Delete => "delete",
        }
    }
}

/// An intent: what an operation is about to do, rewritten before each step
/// acts, so the next command on the domain can roll back (before `committed`)
/// or finish (after) what a killed process left half done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Which operation.
    pub op: Operation,
    /// The snapshot it is about.
    pub snapshot: String,
    /// The step about to run (or last run).
    pub step: String,
    /// Internal snapshots (image, tag) being created: rolled back by deleting
    /// them while the operation is not committed.
    pub new_tags: Vec<(PathBuf, String)>,
    /// Internal snapshots (image, tag) to delete once the operation is committed.
    pub doomed_tags: Vec<(PathBuf, String)>,
    /// Whether the records were committed (then recovery finishes, else rolls back).
    pub committed: bool,
    /// Whether the operation stopped the guest's vCPUs and owes it a `cont`.
    pub paused_guest: bool,
    /// For a revert, the run state the user asked for, so recovery finishes
    /// it the same way (entries written before this field read as recorded).
    #[serde(default)]
    pub revert_mode: RevertMode,
}

impl Intent {
    /// A fresh intent for `op` on `snapshot`.
    pub fn new(op: Operation, snapshot: &str) -> Intent {
        Intent {
            op,
            snapshot: snapshot.to_string(),
            step: "begin".to_string(),
            new_tags: Vec::new(),
            doomed_tags: Vec::new(),
            committed: false,
            paused_guest: false,
            revert_mode: RevertMode::AsRecorded,
        }
    }
}

/// A journal entry left open (by this or a dead process).
#[derive(Debug, Clone)]
pub struct OpenIntent {
    /// The journal row.
    pub id: i64,
    /// What was being done.
    pub intent: Intent,
}

/// A set of record changes committed together.
#[derive(Debug, Default, Clone)]
pub struct Change {
    /// Snapshots to insert or replace.
    pub put: Vec<(SnapshotMeta, SnapshotStorage)>,
    /// Snapshots to remove.
    pub remove: Vec<String>,
    /// New current snapshot: `Some(None)` clears it.
    pub current: Option<Option<String>>,
    /// New current chains for these disks.
    pub chains: Vec<DiskChain>,
}

/// The snapshot tables, on the domain store.
pub struct SnapshotStore<'a> {
    store: &'a Store,
}

fn corrupt(what: String) -> impl FnOnce(serde_json::Error) -> SnapshotError {
    move |source| SnapshotError::CorruptRecord { what, source }
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records hold only strings, numbers and paths")
}

impl<'a> SnapshotStore<'a> {
    /// The snapshot tables of `store`, created or migrated on first use.
    pub fn new(store: &'a Store) -> Result<SnapshotStore<'a>> {
        store.migrate(SNAPSHOT_COMPONENT, SNAPSHOT_MIGRATIONS)?;
        Ok(SnapshotStore { store })
    }

    /// The domain store underneath.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// All snapshots of `domain`, in creation order.
    pub fn snapshots(&self, domain: &str) -> Result<Vec<StoredSnapshot>> {
        let current = self.current(domain)?;
        let rows = self.store.read(|conn| read_snapshot_rows(conn, domain))?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, seq, meta, storage) in rows {
            let what = format!("snapshot '{name}' of domain {domain}");
            let mut meta: SnapshotMeta =
                serde_json::from_str(&meta).map_err(corrupt(what.clone()))?;
            meta.is_current = current.as_deref() == Some(name.as_str());
            let storage = serde_json::from_str(&storage).map_err(corrupt(what))?;
            out.push(StoredSnapshot {
                name,
                seq,
                meta,
                storage,
            });
        }
        Ok(out)
    }

    /// The current snapshot's name, if any.
    pub fn current(&self, domain: &str) -> Result<Option<String>> {
        Ok(self.store.read(|conn| {
            conn.query_row(
                "SELECT name FROM snapshot_current WHERE domain = ?1",
                params![domain],
                |row| row.get(0),
            )
            .optional()
            .map_err(sql("read current snapshot"))
        })?)
    }

    /// The current per-disk chains (the domain layer's records).
    pub fn chains(&self, domain: &str) -> Result<Vec<DiskChain>> {
        Ok(self
            .store
            .read(|conn| crate::store::disk_chains(conn, domain))?)
    }

    /// Files vmsnap created for `domain` (overlays, clones, memory images).
    pub fn owned_files(&self, domain: &str) -> Result<Vec<PathBuf>> {
        Ok(self.store.read(|conn| {
            let mut stmt = conn
                .prepare("SELECT path FROM snapshot_owned_files WHERE domain = ?1 ORDER BY path")
                .map_err(sql("read owned files"))?;
            let paths = stmt
                .query_map(params![domain], |row| row.get::<_, String>(0))
                .map_err(sql("read owned files"))?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(sql("read owned files"))?;
            Ok(paths.into_iter().map(PathBuf::from).collect())
        })?)
    }

    /// Records files vmsnap is about to create, before it creates them, so a
    /// crash can never leave a file vmsnap made and forgot.
    pub fn own(&self, domain: &str, files: &[PathBuf]) -> Result<()> {
        Ok(self.store.transaction(|tx| own_files(tx, domain, files))?)
    }

    /// Forgets files once they are removed from disk.
    pub fn disown(&self, domain: &str, files: &[PathBuf]) -> Result<()> {
        Ok(self.store.transaction(|tx| {
            for file in files {
                tx.execute(
                    "DELETE FROM snapshot_owned_files WHERE domain = ?1 AND path = ?2",
                    params![domain, file.to_string_lossy()],
                )
                .map_err(sql("forget owned file"))?;
            }
            Ok(())
        })?)
    }

    /// Open journal entries of `domain`, oldest first.
    pub fn open_intents(&self, domain: &str) -> Result<Vec<OpenIntent>> {
        let rows = self.store.read(|conn| {
            let mut stmt = conn
                .prepare("SELECT id, intent FROM snapshot_journal WHERE domain = ?1 ORDER BY id")
                .map_err(sql("read journal"))?;
            let rows = stmt
                .query_map(params![domain], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(sql("read journal"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sql("read journal"))?;
            Ok(rows)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, intent) in rows {
            let what = format!("journal entry {id} of domain {domain}");
            out.push(OpenIntent {
                id,
                intent: serde_json::from_str(&intent).map_err(corrupt(what))?,
            });
        }
        Ok(out)
    }

    /// Opens a journal entry, after checking the state directory has room
    /// for the whole operation's records ([`OPERATION_HEADROOM`]): an
    /// operation refused here has changed nothing.
    pub fn begin(&self, domain: &str, intent: &Intent) -> Result<i64> {
        self.store.ensure_room(OPERATION_HEADROOM)?;
        let id = self.store.transaction(|tx| {
            tx.execute(
                "INSERT INTO snapshot_journal (domain, intent) VALUES (?1, ?2)",
                params![domain, to_json(intent)],
            )
            .map_err(sql("open journal entry"))?;
            Ok(tx.last_insert_rowid())
        })?;
        failpoint(intent.op, &intent.step);
        Ok(id)
    }

    /// Records the step an open operation is about to run (a failpoint
    /// named `snapshot.OP.STEP` follows, for crash tests).
    pub fn step(&self, id: i64, intent: &Intent) -> Result<()> {
        self.store.transaction(|tx| {
            tx.execute(
                "UPDATE snapshot_journal SET intent = ?2 WHERE id = ?1",
                params![id, to_json(intent)],
            )
            .map_err(sql("update journal entry"))?;
            Ok(())
        })?;
        failpoint(intent.op, &intent.step);
        Ok(())
    }

    /// Commits an operation's outcome atomically: the records change, and the
    /// journal entry either closes (`intent` `None`) or is marked committed
    /// with the clean-up still to do.
    pub fn commit(
        &self,
        domain: &str,
        id: i64,
        op: Operation,
        change: &Change,
        intent: Option<&Intent>,
    ) -> Result<()> {
        self.store.transaction(|tx| {
            apply_change(tx, domain, change)?;
            match intent {
                None => {
                    tx.execute("DELETE FROM snapshot_journal WHERE id = ?1", params![id])
                        .map_err(sql("close journal entry"))?;
                }
                Some(intent) => {
                    tx.execute(
                        "UPDATE snapshot_journal SET intent = ?2 WHERE id = ?1",
                        params![id, to_json(intent)],
                    )
                    .map_err(sql("update journal entry"))?;
                }
            }
            Ok(())
        })?;
        failpoint(op, "committed");
        Ok(())
    }

    /// Applies record changes without a journal entry (metadata-only commands).
    pub fn apply(&self, domain: &str, change: &Change) -> Result<()> {
        Ok(self
            .store
            .transaction(|tx| apply_change(tx, domain, change))?)
    }

    /// Closes a journal entry (after its rollback or clean-up is done).
    pub fn close(&self, id: i64) -> Result<()> {
        Ok(self.store.transaction(|tx| {
            tx.execute("DELETE FROM snapshot_journal WHERE id = ?1", params![id])
                .map_err(sql("close journal entry"))?;
            Ok(())
        })?)
    }
}

/// Whether `err` is the metadata store refusing a write because the
/// filesystem holding the state directory is full, so a read-only command
/// can warn and still answer (see [`crate::store::is_no_space`]).
pub fn is_store_full(err: &SnapshotError) -> bool {
    matches!(err, SnapshotError::Core(core) if crate::store::is_no_space(core))
}

/// Crash tests stop vmsnap at `snapshot.OP.STEP` (step words joined by `-`).
pub fn failpoint(op: Operation, step: &str) {
    let step: String = step
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    crate::failpoint::hit(&format!("snapshot.{}.{step}", op.as_str()));
}

type SnapshotRow = (String, i64, String, String);

fn read_snapshot_rows(conn: &Connection, domain: &str) -> crate::Result<Vec<SnapshotRow>> {
    let mut stmt = conn
        .prepare("SELECT name, seq, meta, storage FROM snapshots WHERE domain = ?1 ORDER BY seq")
        .map_err(sql("read snapshots"))?;
    let rows = stmt
        .query_map(params![domain], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(sql("read snapshots"))?
        .collect::<rusqlite::Result<Vec<SnapshotRow>>>()
        .map_err(sql("read snapshots"))?;
    Ok(rows)
}

fn own_files(tx: &Transaction<'_>, domain: &str, files: &[PathBuf]) -> crate::Result<()> {
    for file in files {
        tx.execute(
            "INSERT OR IGNORE INTO snapshot_owned_files (domain, path) VALUES (?1, ?2)",
            params![domain, file.to_string_lossy()],
        )
        .map_err(sql("record owned file"))?;
    }
    Ok(())
}

fn apply_change(tx: &Transaction<'_>, domain: &str, change: &Change) -> crate::Result<()> {
    for name in &change.remove {
        tx.execute(
            "DELETE FROM snapshots WHERE domain = ?1 AND name = ?2",
            params![domain, name],
        )
        .map_err(sql("delete snapshot"))?;
    }
    for (meta, storage) in &change.put {
        let existing: Option<i64> = tx
            .query_row(
                "SELECT seq FROM snapshots WHERE domain = ?1 AND name = ?2",
                params![domain, meta.name],
                |row| row.get(0),
            )
            .optional()
            .map_err(sql("read snapshot"))?;
        let seq = match existing {
            Some(seq) => seq,
            None => tx
                .query_row(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots WHERE domain = ?1",
                    params![domain],
                    |row| row.get(0),
                )
                .map_err(sql("number snapshot"))?,
        };
        let mut meta = meta.clone();
        meta.is_current = false;
        tx.execute(
            "INSERT OR REPLACE INTO snapshots (domain, name, seq, meta, storage) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![domain, meta.name, seq, meta.to_json(), to_json(storage)],
        )
        .map_err(sql("write snapshot"))?;
    }
    match &change.current {
        Some(Some(name)) => {
            tx.execute(
                "INSERT OR REPLACE INTO snapshot_current (domain, name) VALUES (?1, ?2)",
                params![domain, name],
            )
            .map_err(sql("set current snapshot"))?;
        }
        Some(None) => {
            tx.execute(
                "DELETE FROM snapshot_current WHERE domain = ?1",
                params![domain],
            )
            .map_err(sql("clear current snapshot"))?;
        }
        None => {}
    }
    for chain in &change.chains {
        crate::store::set_disk_chain(tx, domain, chain)?;
    }
    Ok(())
}
