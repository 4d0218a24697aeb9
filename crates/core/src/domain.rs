//! Domains: defined VMs and the QEMU processes that run them.
//!
//! [`Host`] is the entry point: the state directory plus the metadata store.
//! A [`Domain`] is one defined VM as recorded in the store. Commands that
//! change a domain take its [`DomainLock`] first ([`Host::lock`]); read-only
//! ones ([`Domain::state`], [`Domain::block_stats`]) do not, and talk to QEMU
//! through a second QMP monitor so they never queue behind a locked command.
//!
//! QEMU runs daemonized, so it outlives the vmsnap command that started it.
//! Its state is found again from its pid file (QEMU removes that file when it
//! exits cleanly), the process table and QMP `query-status`. A pid file whose
//! process is gone means QEMU died without its exit path (SIGKILL, a crash):
//! the domain shows as crashed, and the next command that holds the lock
//! records that and removes the stale pid file and sockets.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmsnap_qmp::{Qmp, RunState};

use crate::cmdline::{qemu_args, qemu_binary, LaunchOptions};
use crate::config::{DiskFormat, DomainConfig, QCOW2_MAGIC};
use crate::disk::{DiskChain, DiskLayer};
use crate::error::{Error, Result};
use crate::lock::{DomainLock, LockWait};
use crate::state::{remove_if_present, DomainPaths, StateDir};
use crate::store::{self, DomainRecord, LastExit, Store};

/// How long to wait for a QMP handshake with a QEMU that is known to be alive.
pub const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to initialise before `-daemonize` returns.
const QEMU_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `destroy` waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// The state of a domain, with virsh's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// Guest code is executing.
    Running,
    /// vCPUs are stopped (`suspend`, `start --paused`, migration, snapshot).
    Paused,
    /// The guest suspended itself to RAM (ACPI S3).
    PmSuspended,
    /// The guest shut down but QEMU has not exited yet.
    InShutdown,
    /// No QEMU is running.
    ShutOff,
    /// QEMU died without a clean exit, or the guest panicked / hit an internal error.
    Crashed,
    /// QEMU is alive but did not answer `query-status`.
    NoState,
}

impl DomainState {
    /// The text virsh prints for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::PmSuspended => "pmsuspended",
            DomainState::InShutdown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::NoState => "no state",
        }
    }

    /// Whether a QEMU process exists for the domain.
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }

    fn from_run_state(status: &vmsnap_qmp::StatusInfo) -> DomainState {
        match status.status {
            RunState::Running => DomainState::Running,
            RunState::Suspended => DomainState::PmSuspended,
            RunState::Shutdown => DomainState::InShutdown,
            RunState::InternalError | RunState::GuestPanicked => DomainState::Crashed,
            RunState::Paused
            | RunState::Prelaunch
            | RunState::InMigrate
            | RunState::PostMigrate
            | RunState::FinishMigrate
            | RunState::SaveVm
            | RunState::RestoreVm
            | RunState::Debug
            | RunState::IoError
            | RunState::Watchdog => DomainState::Paused,
            _ if status.running => DomainState::Running,
            _ => DomainState::Paused,
        }
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the pid file and the process table say about a domain's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuProcess {
    /// No pid file: QEMU never ran or exited cleanly.
    NotRunning,
    /// The pid file names a live QEMU started for this domain.
    Alive(u32),
    /// The pid file is there but its process is gone: QEMU died uncleanly.
    Gone(u32),
}

/// Block I/O counters of one disk, with virsh `domblkstat`'s names.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskStats {
    /// The disk's target (`vda`); empty for a sum over all disks.
    pub target: String,
    /// Read requests.
    pub rd_req: u64,
    /// Bytes read.
    pub rd_bytes: u64,
    /// Write requests.
    pub wr_req: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Flush requests.
    pub flush_operations: u64,
    /// Nanoseconds spent reading.
    pub rd_total_times: u64,
    /// Nanoseconds spent writing.
    pub wr_total_times: u64,
    /// Nanoseconds spent flushing.
    pub flush_total_times: u64,
}

impl DiskStats {
    /// Sums the counters of several disks, as virsh does when no disk is named.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a DiskStats>) -> DiskStats {
        all.into_iter()
            .fold(DiskStats::default(), |acc, s| DiskStats {
                target: String::new(),
                rd_req: acc.rd_req + s.rd_req,
                rd_bytes: acc.rd_bytes + s.rd_bytes,
                wr_req: acc.wr_req + s.wr_req,
                wr_bytes: acc.wr_bytes + s.wr_bytes,
                flush_operations: acc.flush_operations + s.flush_operations,
                rd_total_times: acc.rd_total_times + s.rd_total_times,
                wr_total_times: acc.wr_total_times + s.wr_total_times,
                flush_total_times: acc.flush_total_times + s.flush_total_times,
            })
    }

    /// The counters as (virsh field name, value) pairs in virsh's order.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("rd_req", self.rd_req),
            ("rd_bytes", self.rd_bytes),
            ("wr_req", self.wr_req),
            ("wr_bytes", self.wr_bytes),
            ("flush_operations", self.flush_operations),
            ("rd_total_times", self.rd_total_times),
            ("wr_total_times", self.wr_total_times),
            ("flush_total_times", self.flush_total_times),
        ]
    }
}

/// The state directory and metadata store of one vmsnap installation.
#[derive(Debug)]
pub struct Host {
    state: StateDir,
    store: Store,
}

impl Host {
    /// Opens (creating if needed) the state directory and its store.
    /// `None` means the default location (see [`StateDir::default_root`]).
    pub fn open(state_dir: Option<&Path>) -> Result<Host> {
        let state = StateDir::open(state_dir)?;
        let store = Store::open(&state)?;
        Ok(Host { state, store })
    }

    /// The state directory.
    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    /// The metadata store, for modules that keep their own tables in it.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Defines a domain from a config file. Its disks start as single-layer
    /// chains over the configured images.
    pub fn define(&self, config_file: &Path, wait: LockWait) -> Result<Domain> {
        let config = DomainConfig::from_file(config_file)?;
        let paths = self.state.domain_paths(&config.name);
        paths.check_socket_paths()?;
        if self
            .store
            .read(|c| store::load_domain(c, &config.name))?
            .is_some()
        {
            return Err(Error::DomainExists { name: config.name });
        }
        let created = match fs::DirBuilder::new().mode(0o700).create(&paths.dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(Error::io("create domain directory", &paths.dir, e)),
        };
        let result = (|| {
            let _lock = DomainLock::acquire(&config.name, &paths, wait)?;
            crate::failpoint::hit("domain.define.locked");
            let record = DomainRecord {
                name: config.name.clone(),
                uuid: new_uuid(),
                config_toml: config.to_toml(),
                created: store::now_unix(),
                run_id: None,
                last_exit: None,
                last_exit_at: None,
            };
            let disks: Vec<DiskChain> = config
                .disks
                .iter()
                .map(|d| DiskChain::single(&d.target, d.file.clone(), d.format))
                .collect();
            self.store
                .transaction(|tx| store::insert_domain(tx, &record, &disks))?;
            Ok(Domain {
                record,
                config,
                disks,
                paths: paths.clone(),
            })
        })();
        if result.is_err() && created {
            let _ = fs::remove_dir_all(&paths.dir);
        }
        result
    }

    /// Loads a defined domain.
    pub fn domain(&self, name: &str) -> Result<Domain> {
        let record = self
            .store
            .read(|c| store::load_domain(c, name))?
            .ok_or_else(|| Error::DomainNotFound {
                name: name.to_string(),
            })?;
        let config = DomainConfig::from_stored(&record.config_toml, Path::new("(metadata store)"))
            .map_err(|e| Error::StoreContent {
                path: self.store.path().to_path_buf(),
                reason: format!("the stored config of domain '{name}' no longer validates: {e}"),
            })?;
        let disks = self.store.read(|c| store::disk_chains(c, name))?;
        let paths = self.state.domain_paths(name);
        Ok(Domain {
            record,
            config,
            disks,
            paths,
        })
    }

    /// All defined domains, sorted by name.
    pub fn domains(&self) -> Result<Vec<Domain>> {
        let names = self.store.read(store::domain_names)?;
        names.iter().map(|n| self.domain(n)).collect()
    }

    /// Takes the exclusive lock of a defined domain and loads it afresh (so
    /// what the caller sees reflects whatever the previous holder did).
    pub fn lock(&self, name: &str, wait: LockWait) -> Result<(DomainLock, Domain)> {
        self.domain(name)?;
        let paths = self.state.domain_paths(name);
        paths.create()?;
        let lock = DomainLock::acquire(name, &paths, wait)?;
        match self.domain(name) {
            Ok(domain) => Ok((lock, domain)),
            Err(err) => {
                if err.kind() == crate::error::ErrorKind::NotFound {
                    // Undefined while we waited: do not leave a lock file for a domain that is gone.
                    let _ = fs::remove_file(&paths.lock);
                    let _ = fs::remove_dir(&paths.dir);
                }
                Err(err)
            }
        }
    }

    /// Forgets a domain: removes it from the store and deletes its runtime
    /// files. Its disk images are left alone. Refused while QEMU runs, and
    /// while other components (snapshots) hold metadata about it unless
    /// `drop_dependents` is set (virsh's `--snapshots-metadata`), in which
    /// case that metadata goes too but no image or memory file is deleted.
    pub fn undefine(&self, name: &str, wait: LockWait, drop_dependents: bool) -> Result<()> {
        let (lock, domain) = self.lock(name, wait)?;
        match domain.reconcile(&self.store, &lock)? {
            QemuProcess::Alive(_) => {
                return Err(Error::InvalidState {
                    name: name.to_string(),
                    action: "undefine".into(),
                    state: "running".into(),
                    hint: "destroy it or shut it down first".into(),
                })
            }
            QemuProcess::NotRunning | QemuProcess::Gone(_) => {}
        }
        self.store.transaction(|tx| {
            let dependents = store::dependents(tx, name)?;
            if !dependents.is_empty() && !drop_dependents {
                let listed: Vec<String> =
                    dependents.iter().map(|(table, n)| format!("{n} in {table}")).collect();
                return Err(Error::InvalidState {
                    name: name.to_string(),
                    action: "undefine".into(),
                    state: format!("still referenced by snapshot metadata ({})", listed.join(", ")),
                    hint: "delete its snapshots first, or pass --snapshots-metadata to drop that metadata \
                           (image and memory files are kept)"
                        .into(),
                });
            }
            store::delete_domain(tx, name)
        })?;
        crate::failpoint::hit("domain.undefine.forgotten");
        for file in [
            &domain.paths.serial_log,
            &domain.paths.stderr_log,
            &domain.paths.lock,
        ] {
            remove_if_present(file)?;
        }
        // Other files (a snapshot's memory image, say) keep the directory; never delete what we did not make.
        let _ = fs::remove_dir(&domain.paths.dir);
        drop(lock);
        Ok(())
    }
}

/// One defined domain as recorded in the store.
#[derive(Debug, Clone)]
pub struct Domain {
    record: DomainRecord,
    config: DomainConfig,
    disks: Vec<DiskChain>,
    paths: DomainPaths,
}

impl Domain {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The UUID given at define time.
    pub fn uuid(&self) -> &str {
        &self.record.uuid
    }

    /// The validated config (absolute paths).
    pub fn config(&self) -> &DomainConfig {
        &self.config
    }

    /// The disks as QEMU gets them: each target's chain, active layer first.
    pub fn disks(&self) -> &[DiskChain] {
        &self.disks
    }

    /// The domain's runtime files.
    pub fn paths(&self) -> &DomainPaths {
        &self.paths
    }

    /// The virsh-style Id of the current or last run.
    pub fn run_id(&self) -> Option<i64> {
        self.record.run_id
    }

    /// How the last run ended, if vmsnap recorded it.
    pub fn last_exit(&self) -> Option<LastExit> {
        self.record.last_exit
    }

    /// What the pid file and process table say about QEMU (no QMP, no waiting).
    pub fn process(&self) -> Result<QemuProcess> {
        let text = match fs::read_to_string(&self.paths.pid_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(QemuProcess::NotRunning)
            }
            Err(e) => return Err(Error::io("read pid file", &self.paths.pid_file, e)),
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            // A pid file QEMU was still writing, or garbage: no process of ours behind it.
            return Ok(QemuProcess::Gone(0));
        };
        if is_our_qemu(pid, &self.paths.pid_file) {
            Ok(QemuProcess::Alive(pid))
        } else {
            Ok(QemuProcess::Gone(pid))
        }
    }

    /// The domain's state: from the process table, then QMP `query-status`
    /// on the read-only monitor. Never changes anything.
    pub async fn state(&self) -> Result<DomainState> {
        match self.process()? {
            QemuProcess::NotRunning => Ok(match self.record.last_exit {
                Some(LastExit::Crashed) => DomainState::Crashed,
                _ => DomainState::ShutOff,
            }),
            QemuProcess::Gone(_) => Ok(DomainState::Crashed),
            QemuProcess::Alive(_) => {
                match Qmp::connect(&self.paths.query_socket, QMP_CONNECT_TIMEOUT).await {
                    Ok(qmp) => {
                        let status = qmp.query_status().await;
                        qmp.close().await;
                        match status {
                            Ok(status) => Ok(DomainState::from_run_state(&status)),
                            Err(_) => Ok(self.state_after_qmp_failure()),
                        }
                    }
                    Err(_) => Ok(self.state_after_qmp_failure()),
                }
            }
        }
    }

    /// QEMU may have exited while we asked; report what is left.
    fn state_after_qmp_failure(&self) -> DomainState {
        match self.process() {
            Ok(QemuProcess::Alive(_)) => DomainState::NoState,
            Ok(QemuProcess::Gone(_)) => DomainState::Crashed,
            _ => DomainState::ShutOff,
        }
    }

    /// Under the lock: if QEMU died uncleanly, records the crash and removes
    /// its stale pid file and sockets; if it is not running, removes any
    /// stale sockets. Returns what was found.
    pub fn reconcile(&self, store: &Store, lock: &DomainLock) -> Result<QemuProcess> {
        lock.check(self.name())?;
        let process = self.process()?;
        match process {
            QemuProcess::Alive(_) => {}
            QemuProcess::Gone(_) => {
                store.transaction(|tx| store::record_exit(tx, self.name(), LastExit::Crashed))?;
                self.paths.remove_runtime_files()?;
            }
            QemuProcess::NotRunning => self.paths.remove_runtime_files()?,
        }
        Ok(process)
    }

    /// A QMP connection for a command holding the domain lock (the main monitor).
    pub async fn connect_qmp(&self, lock: &DomainLock) -> Result<Qmp> {
        self.connect_main(lock, "talk to").await
    }

    /// [`Domain::connect_qmp`], naming the refused `action` if QEMU is not running.
    async fn connect_main(&self, lock: &DomainLock, action: &str) -> Result<Qmp> {
        lock.check(self.name())?;
        self.require_alive(action)?;
        Qmp::connect(&self.paths.qmp_socket, QMP_CONNECT_TIMEOUT)
            .await
            .map_err(|source| Error::Qmp {
                name: self.name().to_string(),
                source,
            })
    }

    /// A QMP connection on the read-only monitor, for queries without the lock.
    /// Other lock-free readers may queue on it briefly; keep conversations short.
    pub async fn connect_query(&self) -> Result<Qmp> {
        self.require_alive("query")?;
        Qmp::connect(&self.paths.query_socket, QMP_CONNECT_TIMEOUT)
            .await
            .map_err(|source| Error::Qmp {
                name: self.name().to_string(),
                source,
            })
    }

    fn require_alive(&self, action: &str) -> Result<u32> {
        match self.process()? {
            QemuProcess::Alive(pid) => Ok(pid),
            QemuProcess::NotRunning => Err(self.not_running(action, self.inactive_state())),
            QemuProcess::Gone(_) => Err(self.not_running(action, "crashed")),
        }
    }

    /// How an inactive domain shows in `list`: crashed if its last run crashed.
    fn inactive_state(&self) -> &'static str {
        match self.record.last_exit {
            Some(LastExit::Crashed) => DomainState::Crashed.as_str(),
            _ => DomainState::ShutOff.as_str(),
        }
    }

    fn not_running(&self, action: &str, state: &str) -> Error {
        Error::InvalidState {
            name: self.name().to_string(),
            action: action.to_string(),
            state: state.to_string(),
            hint: format!("start it with `vmsnap start {}`", self.name()),
        }
    }

    /// Starts QEMU on the domain's recorded disk chains.
    pub async fn start(
        &self,
        store: &Store,
        lock: &DomainLock,
        options: LaunchOptions,
    ) -> Result<i64> {
        self.start_with_disks(store, lock, &self.disks, options)
            .await
    }

    /// Starts QEMU on explicit disk chains (the snapshot code's way to boot
    /// from a chosen layering, e.g. fresh overlays on frozen images). Returns
    /// the new run's Id. On any failure QEMU is not left running and no pid
    /// file or socket is left behind; QEMU's own error is in the message.
    pub async fn start_with_disks(
        &self,
        store: &Store,
        lock: &DomainLock,
        disks: &[DiskChain],
        options: LaunchOptions,
    ) -> Result<i64> {
        lock.check(self.name())?;
        if let QemuProcess::Alive(_) = self.reconcile(store, lock)? {
            let state = self.state().await?;
            return Err(Error::InvalidState {
                name: self.name().to_string(),
                action: "start".into(),
                state: format!("already {state}"),
                hint: String::new(),
            });
        }
        for chain in disks {
            for layer in &chain.layers {
                check_layer(self.name(), &chain.target, layer)?;
            }
        }
        if self.config.hugepages {
            check_hugepage_pool(self.config.memory_mib)
                .map_err(|why| self.qemu_error(format!("cannot start: {why}")))?;
        }
        self.paths.create()?;
        self.paths.check_socket_paths()?;
        let args = qemu_args(&self.config, disks, &self.paths, &options)?;
        // The Id is given before QEMU exists, so a running domain always has
        // one even if vmsnap is killed right after starting it.
        let (before, id) = store.transaction(|tx| {
            let before = store::run_fields(tx, self.name())?;
            Ok((before, store::record_start(tx, self.name())?))
        })?;
        let launched = self.launch(&args, id).await;
        if launched.is_err() {
            // Best effort: the launch error is what the user needs to see.
            let _ = store.transaction(|tx| store::restore_run_fields(tx, self.name(), &before));
        }
        launched
    }

    /// Runs QEMU and waits until its monitor answers; on failure ends it
    /// and removes its runtime files.
    async fn launch(&self, args: &[String], id: i64) -> Result<i64> {
        self.spawn_qemu(args).await?;
        crate::failpoint::hit("domain.start.spawned");
        let pid = match self.process()? {
            QemuProcess::Alive(pid) => pid,
            _ => {
                let message = one_line_stderr(&self.paths.stderr_log);
                self.cleanup_failed_start(None);
                return Err(self.qemu_error(format!(
                    "exited right after starting: {}",
                    if message.is_empty() {
                        "no message on stderr"
                    } else {
                        &message
                    }
                )));
            }
        };
        let finish = async {
            let qmp = Qmp::connect(&self.paths.query_socket, QMP_CONNECT_TIMEOUT)
                .await
                .map_err(|source| Error::Qmp {
                    name: self.name().to_string(),
                    source,
                })?;
            let status = qmp.query_status().await;
            qmp.close().await;
            status.map_err(|source| Error::Qmp {
                name: self.name().to_string(),
                source,
            })?;
            for socket in [&self.paths.qmp_socket, &self.paths.query_socket] {
                let _ = fs::set_permissions(socket, fs::Permissions::from_mode(0o600));
            }
            Ok::<(), Error>(())
        };
        match finish.await {
            Ok(()) => Ok(id),
            Err(e) => {
                self.cleanup_failed_start(Some(pid));
                Err(e)
            }
        }
    }

    async fn spawn_qemu(&self, args: &[String]) -> Result<()> {
        // QEMU's -daemonize sets umask 027 before it opens the console log, so
        // create the log ourselves, owner-only; QEMU keeps the mode when it truncates.
        create_private_file(&self.paths.serial_log)?;
        let stderr = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.paths.stderr_log)
            .map_err(|e| Error::io("create", &self.paths.stderr_log, e))?;
        let binary = qemu_binary();
        let mut command = Command::new(&binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: umask is async-signal-safe and touches only the child's own state.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| self.qemu_error(format!("cannot be run ({binary}): {e}")))?;
        let deadline = Instant::now() + QEMU_START_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.cleanup_failed_start(self.process().ok().and_then(alive_pid));
                    return Err(self.qemu_error(format!(
                        "did not finish starting within {}s; gave up",
                        QEMU_START_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(Error::io("wait for QEMU", &binary, e)),
            }
        };
        if status.success() {
            return Ok(());
        }
        let message = one_line_stderr(&self.paths.stderr_log);
        self.cleanup_failed_start(None);
        let _ = fs::remove_file(&self.paths.serial_log);
        Err(self.qemu_error(format!(
            "failed to start ({status}): {}",
            if message.is_empty() {
                "no message on stderr".to_string()
            } else {
                message
            }
        )))
    }

    fn qemu_error(&self, what: String) -> Error {
        Error::Qemu {
            name: self.name().to_string(),
            what,
        }
    }

    /// Kills a half-started QEMU (if any) and removes its runtime files.
    fn cleanup_failed_start(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            kill(pid, libc::SIGKILL);
            wait_gone_blocking(pid, &self.paths.pid_file, Duration::from_secs(5));
        }
        let _ = self.paths.remove_runtime_files();
    }

    /// Asks the guest to power off (ACPI power button) and returns at once,
    /// as `virsh shutdown` does; QEMU exits when the guest has shut down.
    pub async fn shutdown(&self, lock: &DomainLock) -> Result<()> {
        let qmp = self.connect_main(lock, "shut down").await?;
        let result = qmp.system_powerdown().await;
        qmp.close().await;
        result.map_err(|source| Error::Qmp {
            name: self.name().to_string(),
            source,
        })
    }

    /// Stops QEMU at once (SIGTERM, then SIGKILL if it does not exit) and
    /// records the run as destroyed.
    pub async fn destroy(&self, store: &Store, lock: &DomainLock) -> Result<()> {
        lock.check(self.name())?;
        let pid = match self.reconcile(store, lock)? {
            QemuProcess::Alive(pid) => pid,
            QemuProcess::NotRunning => {
                return Err(self.not_running("destroy", self.inactive_state()))
            }
            QemuProcess::Gone(_) => return Err(self.not_running("destroy", "crashed")),
        };
        kill(pid, libc::SIGTERM);
        crate::failpoint::hit("domain.destroy.signalled");
        if !wait_gone(pid, &self.paths.pid_file, TERM_GRACE).await {
            kill(pid, libc::SIGKILL);
            if !wait_gone(pid, &self.paths.pid_file, TERM_GRACE).await {
                return Err(self.qemu_error(format!(
                    "(pid {pid}) survived SIGKILL; check the process table"
                )));
            }
        }
        self.paths.remove_runtime_files()?;
        store.transaction(|tx| store::record_exit(tx, self.name(), LastExit::Destroyed))
    }

    /// Pauses the guest's vCPUs (QMP `stop`).
    pub async fn suspend(&self, lock: &DomainLock) -> Result<()> {
        let qmp = self.connect_main(lock, "suspend").await?;
        let result = qmp.stop().await;
        qmp.close().await;
        result.map_err(|source| Error::Qmp {
            name: self.name().to_string(),
            source,
        })
    }

    /// Lets the guest's vCPUs run again (QMP `cont`).
    pub async fn resume(&self, lock: &DomainLock) -> Result<()> {
        let qmp = self.connect_main(lock, "resume").await?;
        let result = qmp.cont().await;
        qmp.close().await;
        result.map_err(|source| Error::Qmp {
            name: self.name().to_string(),
            source,
        })
    }

    /// Runs one QMP command on the main monitor and returns QEMU's `return` value.
    pub async fn qmp_command(
        &self,
        lock: &DomainLock,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let qmp = self.connect_main(lock, "run a QMP command on").await?;
        let result = qmp.execute(command, arguments).await;
        qmp.close().await;
        result.map_err(|source| Error::Qmp {
            name: self.name().to_string(),
            source,
        })
    }

    /// I/O counters of every disk, in disk order (QMP `query-blockstats` on
    /// the read-only monitor).
    pub async fn block_stats(&self) -> Result<Vec<DiskStats>> {
        let qmp = self.connect_query().await?;
        let result = qmp.query_blockstats(false).await;
        qmp.close().await;
        let entries = result.map_err(|source| Error::Qmp {
            name: self.name().to_string(),
            source,
        })?;
        let mut stats = Vec::with_capacity(self.disks.len());
        for chain in &self.disks {
            let device_path = format!("/machine/peripheral/{}/", chain.target);
            let top = chain.active().map(|l| l.node_name.as_str());
            let entry = entries.iter().find(|e| {
                e.qdev
                    .as_deref()
                    .is_some_and(|q| q == chain.target || q.starts_with(&device_path))
                    || (e.node_name.is_some() && e.node_name.as_deref() == top)
            });
            // Zeros would pass for an idle disk: a device QEMU does not list is an error.
            let s = entry.map(|e| e.stats.clone()).ok_or_else(|| {
                self.qemu_error(format!(
                    "lists no block statistics for disk {} (query-blockstats); check `vmsnap qmp {} query-block`",
                    chain.target,
                    self.name()
                ))
            })?;
            stats.push(DiskStats {
                target: chain.target.clone(),
                rd_req: s.rd_operations,
                rd_bytes: s.rd_bytes,
                wr_req: s.wr_operations,
                wr_bytes: s.wr_bytes,
                flush_operations: s.flush_operations,
                rd_total_times: s.rd_total_time_ns,
                wr_total_times: s.wr_total_time_ns,
                flush_total_times: s.flush_total_time_ns,
            });
        }
        Ok(stats)
    }

    /// CPU time QEMU has used in this run (user + system), if it is running.
    pub fn cpu_time(&self) -> Option<Duration> {
        let QemuProcess::Alive(pid) = self.process().ok()? else {
            return None;
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Fields after the command name start at "state" (field 3): utime is 14, stime 15.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as u64 } else { 100 };
        Some(Duration::from_nanos(
            (utime + stime) * 1_000_000_000 / ticks,
        ))
    }
}

/// Creates (or truncates) a file readable by its owner only.
fn create_private_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("set mode 0600 on", path, e))
}

/// Checks one layer before QEMU sees it: present, and qcow2 when declared so.
fn check_layer(domain: &str, target: &str, layer: &DiskLayer) -> Result<()> {
    let invalid = |reason: String| Error::InvalidConfig {
        file: Path::new(&format!("(domain '{domain}')")).to_path_buf(),
        line: None,
        reason: format!("disk {target}: {reason}"),
    };
    let mut magic = [0u8; 4];
    let read = fs::File::open(&layer.path).and_then(|mut f| {
        use std::io::Read;
        f.read(&mut magic)
    });
    match read {
        Err(e) => Err(invalid(format!(
            "image {} cannot be opened: {e}",
            layer.path.display()
        ))),
        Ok(n) if layer.format == DiskFormat::Qcow2 && (n < 4 || magic != QCOW2_MAGIC) => {
            Err(invalid(format!(
                "image {} is recorded as qcow2 but has no qcow2 header",
                layer.path.display()
            )))
        }
        Ok(_) => Ok(()),
    }
}

fn alive_pid(process: QemuProcess) -> Option<u32> {
    match process {
        QemuProcess::Alive(pid) => Some(pid),
        _ => None,
    }
}

/// Whether `pid` is a live (not zombie) QEMU started with this pid file:
/// guards against pid reuse after QEMU died.
fn is_our_qemu(pid: u32, pid_file: &Path) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let Some(pid_file) = pid_file.to_str() else {
        return false;
    };
    // A zombie has an empty cmdline, so it never matches.
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == pid_file.as_bytes())
}

fn kill(pid: u32, signal: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: sending a signal has no memory-safety preconditions; pid was checked non-zero
    // (0 would signal our whole process group).
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

async fn wait_gone(pid: u32, pid_file: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_our_qemu(pid, pid_file) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn wait_gone_blocking(pid: u32, pid_file: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_our_qemu(pid, pid_file) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Where the kernel counts its 2 MiB huge pages.
const HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Checks that the host's 2 MiB huge page pool can hold `memory_mib` of
/// guest RAM now; QEMU's own failure would only say it cannot map memory.
fn check_hugepage_pool(memory_mib: u64) -> std::result::Result<(), String> {
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(Path::new(HUGEPAGES_2M).join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(free), Some(reserved)) = (read("free_hugepages"), read("resv_hugepages")) else {
        return Err(format!(
            "the domain has hugepages = true but this kernel has no 2 MiB huge page pool ({HUGEPAGES_2M})"
        ));
    };
    hugepage_shortfall(memory_mib, free.saturating_sub(reserved))
}

/// The refusal when `available` 2 MiB pages cannot hold `memory_mib`.
fn hugepage_shortfall(memory_mib: u64, available: u64) -> std::result::Result<(), String> {
    let needed = memory_mib.div_ceil(2);
    if available >= needed {
        return Ok(());
    }
    Err(format!(
        "its {memory_mib} MiB of guest RAM need {needed} free 2 MiB huge pages (hugepages = true) and the host has {available}; add {} to vm.nr_hugepages",
        needed - available
    ))
}

/// QEMU's stderr on one line (error messages must be one line), capped in length.
fn one_line_stderr(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut line = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if line.len() > 2000 {
        let mut cut = 2000;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line
}

/// A random (version 4) UUID for `dominfo`, from the kernel's RNG.
fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    let filled = fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    });
    if filled.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepage_pool_must_hold_all_guest_ram() {
        assert_eq!(hugepage_shortfall(1024, 512), Ok(()));
        assert_eq!(hugepage_shortfall(1024, 600), Ok(()));
        let refusal = hugepage_shortfall(1024, 100).unwrap_err();
        assert!(
            refusal.contains("need 512 free 2 MiB huge pages"),
            "{refusal}"
        );
        assert!(
            refusal.contains("the host has 100; add 412 to vm.nr_hugepages"),
            "{refusal}"
        );
    }

    #[test]
    fn uuid_is_version_4() {
        let uuid = new_uuid();
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert!(matches!(&uuid[19..20], "8" | "9" | "a" | "b"), "{uuid}");
        assert_ne!(uuid, new_uuid());
    }

    #[test]
    fn stats_sum_like_virsh() {
        let a = DiskStats {
            target: "vda".into(),
            rd_req: 1,
            wr_bytes: 10,
            ..Default::default()
        };
        let b = DiskStats {
            target: "vdb".into(),
            rd_req: 2,
            wr_bytes: 5,
            ..Default::default()
        };
        let sum = DiskStats::sum([&a, &b]);
        assert_eq!((sum.target.as_str(), sum.rd_req, sum.wr_bytes), ("", 3, 15));
        assert_eq!(sum.fields()[0], ("rd_req", 3));
        assert_eq!(sum.fields()[7].0, "flush_total_times");
    }

    #[test]
    fn process_detection_from_pid_file() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(tmp.path())).unwrap();
        let paths = state.domain_paths("demo");
        paths.create().unwrap();
        let domain = Domain {
            record: DomainRecord {
                name: "demo".into(),
                uuid: new_uuid(),
                config_toml: String::new(),
                created: 0,
                run_id: None,
                last_exit: None,
                last_exit_at: None,
            },
            config: DomainConfig {
                name: "demo".into(),
                memory_mib: 64,
                hugepages: false,
                vcpus: 1,
                accel: crate::config::Accel::Tcg,
                kernel: None,
                initrd: None,
                cmdline: None,
                firmware: None,
                qemu_args: vec![],
                disks: vec![],
            },
            disks: vec![],
            paths: paths.clone(),
        };
        assert_eq!(domain.process().unwrap(), QemuProcess::NotRunning);
        // Our own pid is alive but is not a QEMU started with this pid file: pid reuse.
        fs::write(&paths.pid_file, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(
            domain.process().unwrap(),
            QemuProcess::Gone(std::process::id())
        );
        fs::write(&paths.pid_file, "garbage").unwrap();
        assert_eq!(domain.process().unwrap(), QemuProcess::Gone(0));
    }
}
