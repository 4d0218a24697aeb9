//! The metadata store: one SQLite database (STATE/vmsnap.db, WAL mode) that
//! every vmsnap process shares.
//!
//! Each part of the core owns some tables and a list of [`Migration`]s under
//! its own *component* name; `schema_version` records how far each component
//! has migrated. The domain tables are component [`DOMAIN_COMPONENT`] and are
//! migrated by [`Store::open`]; another module (snapshots) calls
//! [`Store::migrate`] with its own component and list once after opening. All
//! writes go through [`Store::transaction`], so a vmsnap killed half-way leaves
//! either all of an update or none of it.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::ffi::{self, ErrorCode};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::config::DiskFormat;
use crate::disk::{DiskChain, DiskLayer};
use crate::error::{Error, Result};
use crate::state::StateDir;

/// One schema step of a component: applied once, in order of `version`, inside
/// the same transaction that records it.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// 1 for the first step of a component, then 2, 3, ...
    pub version: u32,
    /// SQL run as a batch (several statements allowed).
    pub sql: &'static str,
}

/// Component name of the domain tables in `schema_version`.
pub const DOMAIN_COMPONENT: &str = "domains";

/// The domain tables' migrations.
pub const DOMAIN_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "
        CREATE TABLE domains (
            name         TEXT PRIMARY KEY,
            uuid         TEXT NOT NULL UNIQUE,
            config       TEXT NOT NULL,      -- the config as TOML, paths absolute
            created      INTEGER NOT NULL,   -- unix seconds
            run_id       INTEGER,            -- virsh-style Id of the current or last run
            last_exit    TEXT,               -- NULL, 'shutdown', 'destroyed' or 'crashed'
            last_exit_at INTEGER
        );
        CREATE TABLE disk_layers (
            domain     TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            target     TEXT NOT NULL,
            disk_index INTEGER NOT NULL,    -- position of the disk in the config
            depth      INTEGER NOT NULL,    -- 0 = active layer, 1 = its backing, ...
            path       TEXT NOT NULL,
            format     TEXT NOT NULL CHECK (format IN ('qcow2', 'raw')),
            node_name  TEXT NOT NULL,
            PRIMARY KEY (domain, target, depth)
        );
        CREATE TABLE counters (
            name  TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        );
    ",
}];

/// An open metadata store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// True when the filesystem holding the store was full at open, so only a
    /// read-only view of the database file could be opened: reads answer,
    /// every write is refused with a "no space" error before it starts.
    frozen: bool,
}

/// Wraps a SQLite error; the database path is filled in by [`Store`] when the
/// error leaves a transaction or query, so closures need not carry it.
pub fn sql(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |source| Error::Store {
        path: PathBuf::new(),
        what: what.to_string(),
        source,
    }
}

/// Whether `err` says the filesystem holding the metadata store (or another
/// file vmsnap writes) is full, so callers can tell "free some space" apart
/// from every other failure.
pub fn is_no_space(err: &Error) -> bool {
    matches!(err, Error::Io { source, .. }
        if source.kind() == full_kind(libc::ENOSPC) || source.kind() == full_kind(libc::EDQUOT))
}

/// The `io::ErrorKind` of an errno: `StorageFull` and `QuotaExceeded` are
/// newer than the minimum Rust this workspace supports, so they are named
/// through the errno they stand for.
fn full_kind(errno: i32) -> io::ErrorKind {
    io::Error::from_raw_os_error(errno).kind()
}

impl Store {
    /// Opens (creating if needed) the store of a state directory and brings
    /// the domain tables up to date.
    pub fn open(state: &StateDir) -> Result<Store> {
        Self::open_path(&state.database_path())
    }

    /// Opens the store at an explicit path (tests, tools).
    ///
    /// When the filesystem holding it is full, SQLite cannot even read a WAL
    /// database (it must create and size the `-shm` index), so the store then
    /// falls back to a read-only view that needs no `-shm` file: read-only
    /// commands still answer and every write fails with a "no space" error
    /// naming the directory and its free space ([`is_no_space`]).
    pub fn open_path(path: &Path) -> Result<Store> {
        match Self::open_writable(path) {
            Ok(store) => Ok(store),
            Err(err) if is_no_space(&err) => match Self::open_frozen(path) {
                Ok(Some(store)) => Ok(store),
                Ok(None) | Err(_) => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    fn open_writable(path: &Path) -> Result<Store> {
        let conn = Connection::open(path).map_err(|e| classify(None, path, "open", e))?;
        let fail = |what: &str, source| classify(Some(&conn), path, what, source);
        // The database may hold paths of private images; keep it owner-only like the rest of the state.
        restrict_mode(path);
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| fail("set busy timeout", e))?;
        // WAL mode is persistent: asking again would needlessly write on every open.
        if !is_wal_database(path) {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| fail("enable WAL", e))?;
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| fail("set synchronous", e))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|e| fail("enable foreign keys", e))?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
            frozen: false,
        };
        store.initialize()?;
        // WAL side files exist only after the first write.
        for suffix in ["-wal", "-shm"] {
            restrict_mode(&side_file(path, suffix));
        }
        Ok(store)
    }

    /// The read-only view used when the filesystem is full, without the
    /// `-shm` index SQLite cannot size there. When the write-ahead log is
    /// absent or empty (no writer can add to it on a full disk), the database
    /// file alone is the whole truth: open it `immutable=1`, which takes no
    /// lock and writes nothing. When the log holds transactions (a writer was
    /// killed), read them through an in-memory index instead: SQLite keeps
    /// one on the heap for a connection in exclusive locking mode, which
    /// blocks other vmsnap processes only while this one runs (they cannot
    /// write on a full disk anyway). `None` when there is no database file.
    fn open_frozen(path: &Path) -> Result<Option<Store>> {
        if !path.is_file() {
            return Ok(None);
        }
        let wal = side_file(path, "-wal");
        let wal_len = match std::fs::metadata(&wal) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(Error::io("inspect", &wal, e)),
        };
        let conn = if wal_len <= WAL_HEADER_LEN {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            Connection::open_with_flags(immutable_uri(path), flags)
                .map_err(|e| classify(None, path, "open read-only", e))?
        } else {
            let conn = Connection::open(path).map_err(|e| classify(None, path, "open", e))?;
            let fail = |what: &str, source| classify(Some(&conn), path, what, source);
            conn.busy_timeout(Duration::from_secs(30))
                .map_err(|e| fail("set busy timeout", e))?;
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
                .map_err(|e| fail("lock exclusively", e))?;
            conn
        };
        let store = Store {
            conn,
            path: path.to_path_buf(),
            frozen: true,
        };
        store.initialize()?;
        Ok(Some(store))
    }

    /// Creates the version table and migrates the domain tables, writing
    /// only when something is missing, so an up-to-date store opens without
    /// a write.
    fn initialize(&self) -> Result<()> {
        let has_versions: bool = self.read(|conn| {
            conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version')",
                [],
                |r| r.get(0),
            )
            .map_err(sql("look for schema_version"))
        })?;
        if !has_versions {
            self.transaction(|tx| {
                tx.execute_batch(
                    "CREATE TABLE IF NOT EXISTS schema_version (
                         component TEXT PRIMARY KEY,
                         version   INTEGER NOT NULL
                     );",
                )
                .map_err(sql("create schema_version"))
            })?;
        }
        self.migrate(DOMAIN_COMPONENT, DOMAIN_MIGRATIONS)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store was opened read-only because its filesystem is full.
    pub fn is_read_only(&self) -> bool {
        self.frozen
    }

    /// Fails with the "no space" error when the store cannot be written (opened
    /// read-only, or no block or inode left on its filesystem), so a command
    /// that would change images before its first store write refuses before
    /// it starts.
    pub fn ensure_writable(&self) -> Result<()> {
        self.ensure_room(0)
    }

    /// Like [`Self::ensure_writable`], and also fails when fewer than `bytes`
    /// are free next to the store: an operation that journals its steps
    /// checks it needs room for all of them before its first step, instead of
    /// failing half way. A filesystem whose free space cannot be read is not
    /// refused for that.
    pub fn ensure_room(&self, bytes: u64) -> Result<()> {
        if self.frozen {
            return Err(no_space_error(&self.path, "update"));
        }
        match FreeSpace::of(store_dir(&self.path)) {
            Ok(free) if free.exhausted() || free.available_bytes < bytes => {
                Err(no_space_error(&self.path, "update"))
            }
            _ => Ok(()),
        }
    }

    /// Applies the migrations of `component` that are newer than its recorded
    /// version, each in its own transaction together with the version bump.
    /// Refuses a database migrated by a newer vmsnap than this one.
    pub fn migrate(&self, component: &str, migrations: &[Migration]) -> Result<()> {
        let newest = migrations.iter().map(|m| m.version).max().unwrap_or(0);
        let current = self.schema_version(component)?;
        if current > newest {
            return Err(Error::StoreContent {
                path: self.path.clone(),
                reason: format!(
                    "component '{component}' is at schema version {current}, newer than this vmsnap \
                     knows ({newest}); use a newer vmsnap"
                ),
            });
        }
        let mut pending: Vec<&Migration> =
            migrations.iter().filter(|m| m.version > current).collect();
        pending.sort_by_key(|m| m.version);
        for migration in pending {
            self.transaction(|tx| {
                // Re-check inside the write transaction: another process may have migrated meanwhile.
                let now = version_in(tx, component)?;
                if now >= migration.version {
                    return Ok(());
                }
                tx.execute_batch(migration.sql)
                    .map_err(sql("apply migration"))?;
                tx.execute(
                    "INSERT INTO schema_version (component, version) VALUES (?1, ?2)
                     ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                    params![component, migration.version],
                )
                .map_err(sql("record schema version"))?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The schema version recorded for `component` (0 if never migrated).
    pub fn schema_version(&self, component: &str) -> Result<u32> {
        self.read(|conn| version_in(conn, component))
    }

    /// Runs `f` in an immediate (write-locking) transaction and commits if it
    /// returns `Ok`; any error rolls everything back.
    pub fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let run = || -> Result<T> {
            let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
                .map_err(sql("begin transaction"))?;
            let value = f(&tx)?;
            tx.commit().map_err(sql("commit"))?;
            Ok(value)
        };
        self.ensure_writable()?;
        run().map_err(|e| self.with_path(e, "update"))
    }

    /// Runs read-only queries on the connection (a consistent snapshot per statement).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        f(&self.conn).map_err(|e| self.with_path(e, "read"))
    }

    /// Fills in the database path and turns a SQLite failure caused by a
    /// full filesystem into the "no space" error (`verb` says what failed).
    fn with_path(&self, err: Error, verb: &str) -> Error {
        match err {
            Error::Store { ref source, .. }
                if is_no_space_failure(Some(&self.conn), &self.path, source) =>
            {
                no_space_error(&self.path, verb)
            }
            Error::Store { path, what, source } if path.as_os_str().is_empty() => Error::Store {
                path: self.path.clone(),
                what,
                source,
            },
            Error::StoreContent { path, reason } if path.as_os_str().is_empty() => {
                Error::StoreContent {
                    path: self.path.clone(),
                    reason,
                }
            }
            other => other,
        }
    }
}

/// Bytes of a write-ahead log's header: a log no longer than this holds no
/// transaction.
const WAL_HEADER_LEN: u64 = 32;

/// `path` with `suffix` appended (SQLite's `-wal` and `-shm` side files).
fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut side = OsString::from(path.as_os_str());
    side.push(suffix);
    PathBuf::from(side)
}

/// Whether the database file's header already says WAL (read and write
/// versions 2 at bytes 18 and 19), read directly so it costs no SQLite I/O.
fn is_wal_database(path: &Path) -> bool {
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .is_ok()
        && header[18] == 2
        && header[19] == 2
}

/// A `file:` URI opening `path` immutable (no locks, no `-shm`, no `-wal`).
fn immutable_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            uri.push(byte as char);
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// Wraps a SQLite failure of opening the store, recognising a full filesystem.
fn classify(conn: Option<&Connection>, path: &Path, what: &str, source: rusqlite::Error) -> Error {
    if is_no_space_failure(conn, path, &source) {
        return no_space_error(path, "open");
    }
    Error::Store {
        path: path.to_path_buf(),
        what: what.into(),
        source,
    }
}

/// Whether a SQLite failure comes from a full filesystem: SQLITE_FULL, or an
/// I/O error (growing the `-shm` index, writing the log, creating a side
/// file) whose system error is ENOSPC or EDQUOT. When SQLite kept no system
/// error, an I/O error on a filesystem with no free block or inode counts too.
fn is_no_space_failure(conn: Option<&Connection>, path: &Path, source: &rusqlite::Error) -> bool {
    let rusqlite::Error::SqliteFailure(failure, _) = source else {
        return false;
    };
    match failure.code {
        ErrorCode::DiskFull => true,
        ErrorCode::SystemIoFailure | ErrorCode::CannotOpen => {
            // SAFETY: the handle belongs to a live connection and
            // sqlite3_system_errno only reads a field of it.
            let errno = conn.map_or(0, |c| unsafe { ffi::sqlite3_system_errno(c.handle()) });
            match errno {
                libc::ENOSPC | libc::EDQUOT => true,
                0 => FreeSpace::of(store_dir(path)).is_ok_and(|free| free.exhausted()),
                _ => false,
            }
        }
        _ => false,
    }
}

/// The directory holding the database (the state directory).
fn store_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The refusal when the store's filesystem is full: names the directory and
/// how much room is left, as an I/O error of ENOSPC's kind (`StorageFull`).
fn no_space_error(path: &Path, verb: &str) -> Error {
    let dir = store_dir(path);
    let room = match FreeSpace::of(dir) {
        Ok(free) => free.to_string(),
        Err(e) => format!("free space unknown: {e}"),
    };
    Error::Io {
        action: format!("{verb} the metadata store"),
        path: path.to_path_buf(),
        source: io::Error::new(
            full_kind(libc::ENOSPC),
            format!(
                "no space left on the filesystem holding the state directory {} ({room}); \
                 free some space there and retry",
                dir.display()
            ),
        ),
    }
}

/// Free room on a filesystem, as statvfs(3) reports it for this process
/// (root may also use the blocks reserved for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FreeSpace {
    available_bytes: u64,
    total_bytes: u64,
    available_inodes: u64,
    total_inodes: u64,
}

impl FreeSpace {
    fn of(dir: &Path) -> io::Result<FreeSpace> {
        let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: c_path is NUL-terminated and stat points to writable memory
        // of the right type; it is read only after statvfs succeeded.
        let stat = unsafe {
            if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            stat.assume_init()
        };
        let block = stat.f_frsize as u64;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let free_blocks = if unsafe { libc::geteuid() } == 0 {
            stat.f_bfree
        } else {
            stat.f_bavail
        };
        Ok(FreeSpace {
            available_bytes: free_blocks as u64 * block,
            total_bytes: stat.f_blocks as u64 * block,
            available_inodes: stat.f_favail as u64,
            total_inodes: stat.f_files as u64,
        })
    }

    /// No block, or no inode, left (filesystems without inode counts report 0 of 0).
    fn exhausted(&self) -> bool {
        self.available_bytes == 0 || (self.total_inodes > 0 && self.available_inodes == 0)
    }
}

impl std::fmt::Display for FreeSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} free of {}",
            human_bytes(self.available_bytes),
            human_bytes(self.total_bytes)
        )?;
        if self.total_inodes > 0 && self.available_inodes == 0 {
            write!(f, ", no inodes free")?;
        }
        Ok(())
    }
}

/// `n` bytes in binary units with at most one decimal ("0 B", "12 KiB", "3.9 MiB").
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() < 0.05 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn restrict_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

fn version_in(conn: &Connection, component: &str) -> Result<u32> {
    conn.query_row(
        "SELECT version FROM schema_version WHERE component = ?1",
        [component],
        |row| row.get(0),
    )
    .optional()
    .map_err(sql("read schema version"))
    .map(|v| v.unwrap_or(0))
}

/// How a domain's last QEMU ended, as far as vmsnap knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastExit {
    /// Asked to shut down (ACPI) or the guest powered off.
    Shutdown,
    /// Stopped by `destroy`.
    Destroyed,
    /// QEMU died without its clean exit path (killed, crashed).
    Crashed,
}

impl LastExit {
    /// The text kept in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            LastExit::Shutdown => "shutdown",
            LastExit::Destroyed => "destroyed",
            LastExit::Crashed => "crashed",
        }
    }
}

impl FromStr for LastExit {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "shutdown" => Ok(LastExit::Shutdown),
            "destroyed" => Ok(LastExit::Destroyed),
            "crashed" => Ok(LastExit::Crashed),
            other => Err(format!("unknown last exit '{other}'")),
        }
    }
}

/// A row of the `domains` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRecord {
    /// Domain name (primary key).
    pub name: String,
    /// UUID generated at define time, shown by `dominfo`.
    pub uuid: String,
    /// The domain config as TOML with absolute paths.
    pub config_toml: String,
    /// When it was defined (unix seconds).
    pub created: i64,
    /// The virsh-style Id given to its current or last run.
    pub run_id: Option<i64>,
    /// How the last run ended, if vmsnap saw it end.
    pub last_exit: Option<LastExit>,
    /// When that was recorded (unix seconds).
    pub last_exit_at: Option<i64>,
}

/// Seconds since the epoch, for timestamps in the store.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Inserts a new domain and its disk chains; [`Error::DomainExists`] if the name is taken.
pub fn insert_domain(
    tx: &Transaction<'_>,
    record: &DomainRecord,
    disks: &[DiskChain],
) -> Result<()> {
    let taken: bool = tx
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM domains WHERE name = ?1)",
            [&record.name],
            |r| r.get(0),
        )
        .map_err(sql("look up domain"))?;
    if taken {
        return Err(Error::DomainExists {
            name: record.name.clone(),
        });
    }
    tx.execute(
        "INSERT INTO domains (name, uuid, config, created, run_id, last_exit, last_exit_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            record.name,
            record.uuid,
            record.config_toml,
            record.created,
            record.run_id,
            record.last_exit.map(LastExit::as_str),
            record.last_exit_at
        ],
    )
    .map_err(sql("insert domain"))?;
    for chain in disks {
        set_disk_chain(tx, &record.name, chain)?;
    }
    Ok(())
}

/// Reads one domain's row, `None` if it is not defined.
pub fn load_domain(conn: &Connection, name: &str) -> Result<Option<DomainRecord>> {
    let row = conn
        .query_row(
            "SELECT name, uuid, config, created, run_id, last_exit, last_exit_at FROM domains WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    DomainRecord {
                        name: r.get(0)?,
                        uuid: r.get(1)?,
                        config_toml: r.get(2)?,
                        created: r.get(3)?,
                        run_id: r.get(4)?,
                        last_exit: None,
                        last_exit_at: r.get(6)?,
                    },
                    r.get::<_, Option<String>>(5)?,
                ))
            },
        )
        .optional()
        .map_err(sql("read domain"))?;
    let Some((mut record, last_exit)) = row else {
        return Ok(None);
    };
    record.last_exit = last_exit.and_then(|text| text.parse().ok());
    Ok(Some(record))
}

/// Names of all defined domains, sorted.
pub fn domain_names(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare("SELECT name FROM domains ORDER BY name")
        .map_err(sql("list domains"))?;
    let names = stmt
        .query_map([], |r| r.get(0))
        .map_err(sql("list domains"))?
        .collect::<rusqlite::Result<Vec<String>>>()
        .map_err(sql("list domains"))?;
    Ok(names)
}

/// Rows of other components that reference `domain` through a foreign key
/// to `domains(name)`, as (table, row count) for tables with rows; the domain
/// tables themselves are not counted. Lets `undefine` refuse to silently
/// cascade away, say, snapshot metadata, without knowing other schemas.
pub fn dependents(conn: &Connection, domain: &str) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn
        .prepare(
            "SELECT m.name, f.\"from\" FROM sqlite_master AS m, pragma_foreign_key_list(m.name) AS f
             WHERE m.type = 'table' AND f.\"table\" = 'domains' AND m.name NOT IN ('domains', 'disk_layers')
             ORDER BY m.name",
        )
        .map_err(sql("find tables referencing domains"))?;
    let references = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(sql("find tables referencing domains"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql("find tables referencing domains"))?;
    let quote = |ident: &str| format!("\"{}\"", ident.replace('"', "\"\""));
    let mut found = Vec::new();
    for (table, column) in references {
        let count: i64 = conn
            .query_row(
                &format!(
                    "SELECT COUNT(*) FROM {} WHERE {} = ?1",
                    quote(&table),
                    quote(&column)
                ),
                [domain],
                |r| r.get(0),
            )
            .map_err(sql("count rows referencing a domain"))?;
        if count > 0 {
            found.push((table, count as u64));
        }
    }
    Ok(found)
}

/// Removes a domain and (by cascade) its disk layers and any rows of other
/// components that reference it with ON DELETE CASCADE. False if it did not exist.
pub fn delete_domain(tx: &Transaction<'_>, name: &str) -> Result<bool> {
    let n = tx
        .execute("DELETE FROM domains WHERE name = ?1", [name])
        .map_err(sql("delete domain"))?;
    Ok(n > 0)
}

/// The disk chains of a domain in config order.
pub fn disk_chains(conn: &Connection, domain: &str) -> Result<Vec<DiskChain>> {
    let mut stmt = conn
        .prepare(
            "SELECT target, path, format, node_name FROM disk_layers
             WHERE domain = ?1 ORDER BY disk_index, target, depth",
        )
        .map_err(sql("read disk layers"))?;
    let rows = stmt
        .query_map([domain], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })
        .map_err(sql("read disk layers"))?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql("read disk layers"))?;
    let mut chains: Vec<DiskChain> = Vec::new();
    for (target, path, format, node_name) in rows {
        let format = DiskFormat::from_str(&format).map_err(|reason| Error::StoreContent {
            path: PathBuf::new(),
            reason: format!("domain '{domain}' disk {target}: {reason}"),
        })?;
        let layer = DiskLayer {
            path: PathBuf::from(path),
            format,
            node_name,
        };
        match chains.last_mut() {
            Some(chain) if chain.target == target => chain.layers.push(layer),
            _ => chains.push(DiskChain {
                target,
                layers: vec![layer],
            }),
        }
    }
    Ok(chains)
}

/// Replaces the recorded chain of one disk (active layer first). The disk
/// keeps its position among the domain's disks; a new target goes last.
pub fn set_disk_chain(tx: &Transaction<'_>, domain: &str, chain: &DiskChain) -> Result<()> {
    let index: Option<i64> = tx
        .query_row(
            "SELECT disk_index FROM disk_layers WHERE domain = ?1 AND target = ?2 LIMIT 1",
            params![domain, chain.target],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql("read disk layers"))?;
    let index = match index {
        Some(index) => index,
        None => tx
            .query_row(
                "SELECT COALESCE(MAX(disk_index) + 1, 0) FROM disk_layers WHERE domain = ?1",
                [domain],
                |r| r.get(0),
            )
            .map_err(sql("read disk layers"))?,
    };
    tx.execute(
        "DELETE FROM disk_layers WHERE domain = ?1 AND target = ?2",
        params![domain, chain.target],
    )
    .map_err(sql("replace disk layers"))?;
    for (depth, layer) in chain.layers.iter().enumerate() {
        let path = layer.path.to_str().ok_or_else(|| Error::StoreContent {
            path: PathBuf::new(),
            reason: format!(
                "image path {} is not UTF-8; vmsnap needs UTF-8 paths",
                layer.path.display()
            ),
        })?;
        tx.execute(
            "INSERT INTO disk_layers (domain, target, disk_index, depth, path, format, node_name)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                domain,
                chain.target,
                index,
                depth as i64,
                path,
                layer.format.as_str(),
                layer.node_name
            ],
        )
        .map_err(sql("write disk layer"))?;
    }
    Ok(())
}

/// A domain's run fields (Id, last exit) as a start found them, so a start
/// that fails can put them back: `list` then shows the domain as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFields {
    run_id: Option<i64>,
    last_exit: Option<String>,
    last_exit_at: Option<i64>,
}

/// Reads a domain's run fields (before [`record_start`] changes them).
pub fn run_fields(conn: &Connection, domain: &str) -> Result<RunFields> {
    conn.query_row(
        "SELECT run_id, last_exit, last_exit_at FROM domains WHERE name = ?1",
        params![domain],
        |r| {
            Ok(RunFields {
                run_id: r.get(0)?,
                last_exit: r.get(1)?,
                last_exit_at: r.get(2)?,
            })
        },
    )
    .map_err(sql("read domain run"))
}

/// Puts back the run fields a failed start had replaced. The Id it used
/// stays used, as libvirt's does after a failed start.
pub fn restore_run_fields(tx: &Transaction<'_>, domain: &str, fields: &RunFields) -> Result<()> {
    tx.execute(
        "UPDATE domains SET run_id = ?2, last_exit = ?3, last_exit_at = ?4 WHERE name = ?1",
        params![domain, fields.run_id, fields.last_exit, fields.last_exit_at],
    )
    .map_err(sql("restore domain run"))?;
    Ok(())
}

/// Gives the domain a new virsh-style Id for the run being started and clears
/// its last exit. Ids grow across all domains, as libvirt's do.
pub fn record_start(tx: &Transaction<'_>, domain: &str) -> Result<i64> {
    let id: i64 = tx
        .query_row(
            "INSERT INTO counters (name, value) VALUES ('run_id', 1)
             ON CONFLICT(name) DO UPDATE SET value = value + 1
             RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(sql("allocate domain id"))?;
    tx.execute(
        "UPDATE domains SET run_id = ?2, last_exit = NULL, last_exit_at = NULL WHERE name = ?1",
        params![domain, id],
    )
    .map_err(sql("record start"))?;
    Ok(id)
}

/// Records how the domain's QEMU ended.
pub fn record_exit(tx: &Transaction<'_>, domain: &str, exit: LastExit) -> Result<()> {
    tx.execute(
        "UPDATE domains SET last_exit = ?2, last_exit_at = ?3 WHERE name = ?1",
        params![domain, exit.as_str(), now_unix()],
    )
    .map_err(sql("record exit"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn record(name: &str) -> DomainRecord {
        DomainRecord {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            config_toml: "name = \"x\"\n".into(),
            created: 1,
            run_id: None,
            last_exit: None,
            last_exit_at: None,
        }
    }

    #[test]
    fn domains_and_chains_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_path(&tmp.path().join("db")).unwrap();
        assert_eq!(store.schema_version(DOMAIN_COMPONENT).unwrap(), 1);
        let vdb = DiskChain::single("vdb", "/img/b.raw".into(), DiskFormat::Raw);
        let vda = DiskChain::single("vda", "/img/a.qcow2".into(), DiskFormat::Qcow2);
        store
            .transaction(|tx| insert_domain(tx, &record("demo"), &[vdb.clone(), vda.clone()]))
            .unwrap();
        let err = store
            .transaction(|tx| insert_domain(tx, &record("demo"), &[]))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);

        let loaded = store.read(|c| load_domain(c, "demo")).unwrap().unwrap();
        assert_eq!(loaded, record("demo"));
        assert_eq!(
            store.read(|c| disk_chains(c, "demo")).unwrap(),
            vec![vdb.clone(), vda.clone()]
        );

        let mut grown = vdb.clone();
        grown.layers.insert(
            0,
            DiskLayer {
                path: "/img/b-ov.qcow2".into(),
                format: DiskFormat::Qcow2,
                node_name: "snap-1".into(),
            },
        );
        store
            .transaction(|tx| set_disk_chain(tx, "demo", &grown))
            .unwrap();
        assert_eq!(
            store.read(|c| disk_chains(c, "demo")).unwrap(),
            vec![grown, vda]
        );

        let first = store.transaction(|tx| record_start(tx, "demo")).unwrap();
        store
            .transaction(|tx| record_exit(tx, "demo", LastExit::Crashed))
            .unwrap();
        let loaded = store.read(|c| load_domain(c, "demo")).unwrap().unwrap();
        assert_eq!(loaded.run_id, Some(first));
        assert_eq!(loaded.last_exit, Some(LastExit::Crashed));
        let second = store.transaction(|tx| record_start(tx, "demo")).unwrap();
        assert_eq!(second, first + 1);
        assert_eq!(
            store
                .read(|c| load_domain(c, "demo"))
                .unwrap()
                .unwrap()
                .last_exit,
            None
        );

        assert!(store.transaction(|tx| delete_domain(tx, "demo")).unwrap());
        assert!(store.read(|c| disk_chains(c, "demo")).unwrap().is_empty());
        assert!(store.read(domain_names).unwrap().is_empty());
    }

    #[test]
    fn dependents_of_other_components_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_path(&tmp.path().join("db")).unwrap();
        const EXTRA: &[Migration] = &[Migration {
            version: 1,
            sql: "CREATE TABLE notes (dom TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE, n INTEGER);",
        }];
        store.migrate("notes", EXTRA).unwrap();
        let chain = DiskChain::single("vda", "/img/a.qcow2".into(), DiskFormat::Qcow2);
        store
            .transaction(|tx| insert_domain(tx, &record("demo"), &[chain]))
            .unwrap();
        assert!(store.read(|c| dependents(c, "demo")).unwrap().is_empty());
        store
            .transaction(|tx| {
                tx.execute("INSERT INTO notes VALUES ('demo', 1), ('demo', 2)", [])
                    .map_err(sql("insert"))
            })
            .unwrap();
        assert_eq!(
            store.read(|c| dependents(c, "demo")).unwrap(),
            vec![("notes".to_string(), 2)]
        );
        store.transaction(|tx| delete_domain(tx, "demo")).unwrap();
        let left: i64 = store
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM notes", [], |r| r.get(0))
                    .map_err(sql("q"))
            })
            .unwrap();
        assert_eq!(left, 0, "cascade removed the dependents");
    }

    #[test]
    fn failed_transaction_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_path(&tmp.path().join("db")).unwrap();
        let err = store
            .transaction(|tx| {
                insert_domain(tx, &record("demo"), &[])?;
                Err::<(), _>(Error::DomainNotFound {
                    name: "boom".into(),
                })
            })
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(store.read(domain_names).unwrap().is_empty());
    }

    #[test]
    fn component_migrations_apply_once_and_refuse_newer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        const V1: &[Migration] = &[Migration {
            version: 1,
            sql: "CREATE TABLE extra (x INTEGER);",
        }];
        const V2: &[Migration] = &[
            Migration {
                version: 1,
                sql: "CREATE TABLE extra (x INTEGER);",
            },
            Migration {
                version: 2,
                sql: "ALTER TABLE extra ADD COLUMN y INTEGER;",
            },
        ];
        {
            let store = Store::open_path(&path).unwrap();
            store.migrate("extra", V1).unwrap();
            store.migrate("extra", V1).unwrap();
            store.migrate("extra", V2).unwrap();
            assert_eq!(store.schema_version("extra").unwrap(), 2);
        }
        let store = Store::open_path(&path).unwrap();
        store
            .read(|c| {
                c.execute("INSERT INTO extra (x, y) VALUES (1, 2)", [])
                    .map_err(sql("insert"))
            })
            .unwrap();
        let err = store.migrate("extra", V1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Store);
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn database_is_private_and_wal() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let store = Store::open_path(&path).unwrap();
        let mode: String = store
            .read(|c| {
                c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                    .map_err(sql("q"))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn sizes_read_like_df() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(12 * 1024), "12 KiB");
        assert_eq!(human_bytes(4 << 20), "4 MiB");
        assert_eq!(human_bytes((39 << 20) / 10), "3.9 MiB");
        assert_eq!(human_bytes(150 << 30), "150 GiB");
    }

    #[test]
    fn immutable_uri_escapes_what_uris_reserve() {
        assert_eq!(
            immutable_uri(Path::new("/var/lib/vm snap/a?b#c%d.db")),
            "file:/var/lib/vm%20snap/a%3Fb%23c%25d.db?immutable=1"
        );
    }

    #[test]
    fn reopening_does_not_rewrite_the_journal_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        assert!(!is_wal_database(&path));
        drop(Store::open_path(&path).unwrap());
        assert!(is_wal_database(&path));
        let store = Store::open_path(&path).unwrap();
        assert!(!store.is_read_only());
        store.ensure_writable().unwrap();
    }

    /// A tmpfs of `size` mounted on a fresh directory, unmounted on drop;
    /// `None` when not root (mounting needs it), so the caller can skip.
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn mount(size: &str) -> Option<SmallFs> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: mounting a tmpfs needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs on {}", dir.path().display());
            Some(SmallFs { dir })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes zeros until the filesystem is full; returns the filler file.
        fn fill(&self) -> PathBuf {
            use std::io::Write;
            let filler = self.path().join("filler");
            let mut file = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 4096];
            while file.write_all(&block).is_ok() {}
            let _ = file.sync_all();
            assert!(FreeSpace::of(self.path()).unwrap().exhausted());
            filler
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    #[test]
    fn full_filesystem_still_reads_and_refuses_writes_saying_why() {
        let Some(fs) = SmallFs::mount("1m") else {
            return;
        };
        let path = fs.path().join("vmsnap.db");
        {
            let store = Store::open_path(&path).unwrap();
            let chain = DiskChain::single("vda", "/img/a.qcow2".into(), DiskFormat::Qcow2);
            store
                .transaction(|tx| insert_domain(tx, &record("demo"), &[chain]))
                .unwrap();
        }
        let filler = fs.fill();

        let store = Store::open_path(&path).unwrap();
        assert!(store.is_read_only());
        assert_eq!(store.read(domain_names).unwrap(), ["demo"]);
        assert_eq!(store.read(|c| disk_chains(c, "demo")).unwrap().len(), 1);
        let err = store
            .transaction(|tx| insert_domain(tx, &record("other"), &[]))
            .unwrap_err();
        assert!(is_no_space(&err), "{err}");
        let text = err.to_string();
        assert!(text.contains("no space left"), "{text}");
        assert!(text.contains(&fs.path().display().to_string()), "{text}");
        assert!(text.contains("0 B free of 1 MiB"), "{text}");
        assert!(is_no_space(&store.ensure_writable().unwrap_err()));
        drop(store);

        std::fs::remove_file(filler).unwrap();
        let store = Store::open_path(&path).unwrap();
        assert!(!store.is_read_only());
        store
            .transaction(|tx| insert_domain(tx, &record("other"), &[]))
            .unwrap();
        assert_eq!(store.read(domain_names).unwrap(), ["demo", "other"]);
    }

    #[test]
    fn full_filesystem_still_reads_what_only_the_log_holds() {
        let Some(fs) = SmallFs::mount("1m") else {
            return;
        };
        let path = fs.path().join("vmsnap.db");
        let wal = side_file(&path, "-wal");
        // What a killed writer leaves: a log holding transactions the
        // database file lacks (nothing was checkpointed while it ran).
        let (saved_db, saved_log) = {
            let store = Store::open_path(&path).unwrap();
            store
                .transaction(|tx| insert_domain(tx, &record("demo"), &[]))
                .unwrap();
            (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap())
        };
        assert!(saved_log.len() as u64 > WAL_HEADER_LEN);
        std::fs::write(&path, &saved_db).unwrap();
        std::fs::write(&wal, &saved_log).unwrap();
        let _ = std::fs::remove_file(side_file(&path, "-shm"));
        let file_alone = Connection::open_with_flags(
            immutable_uri(&path),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
        .unwrap();
        assert!(
            domain_names(&file_alone).map_or(true, |names| names.is_empty()),
            "the database file alone must lack the domain for this test to mean anything"
        );
        drop(file_alone);
        let filler = fs.fill();

        let store = Store::open_path(&path).unwrap();
        assert!(store.is_read_only());
        assert_eq!(store.read(domain_names).unwrap(), ["demo"]);
        let err = store
            .transaction(|tx| delete_domain(tx, "demo"))
            .unwrap_err();
        assert!(is_no_space(&err), "{err}");
        drop(store);

        std::fs::remove_file(filler).unwrap();
        let store = Store::open_path(&path).unwrap();
        assert!(!store.is_read_only());
        assert_eq!(store.read(domain_names).unwrap(), ["demo"]);
    }

    #[test]
    fn write_that_meets_a_full_disk_is_reported_as_no_space() {
        let Some(fs) = SmallFs::mount("1m") else {
            return;
        };
        let path = fs.path().join("vmsnap.db");
        let store = Store::open_path(&path).unwrap();
        fs.fill();
        let mut big = record("big");
        big.config_toml = "#".repeat(256 * 1024);
        let err = store
            .transaction(|tx| insert_domain(tx, &big, &[]))
            .unwrap_err();
        assert!(is_no_space(&err), "{err}");
        assert!(
            err.to_string().contains("cannot update the metadata store"),
            "{err}"
        );
        assert!(store.read(domain_names).unwrap().is_empty());
    }
}
