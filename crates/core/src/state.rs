//! The state directory: where vmsnap keeps its metadata store and, per domain,
//! QEMU's sockets, pid file, logs and the domain lock.
//!
//! Layout:
//! ```text
//! STATE/vmsnap.db                    metadata store (SQLite, WAL)
//! STATE/domains/NAME/lock            per-domain flock(2) lock, holds the holder's pid
//! STATE/domains/NAME/qmp.sock        QMP monitor for commands run under the lock
//! STATE/domains/NAME/query.sock      second QMP monitor for read-only queries
//! STATE/domains/NAME/qemu.pid        QEMU's pid file (QEMU removes it on a clean exit)
//! STATE/domains/NAME/serial.log      the guest's first serial port
//! STATE/domains/NAME/qemu.stderr     QEMU's stderr while it starts
//! ```
//! Everything is private to its owner: directories are created 0700 and QEMU
//! runs with umask 077, because sockets give full control of the VM and logs
//! may hold guest secrets.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The environment variable naming the state directory (the CLI's `--state-dir` wins over it).
pub const STATE_DIR_ENV: &str = "VMSNAP_STATE_DIR";

/// The longest path a unix socket can have (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// An opened (existing, private) state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The files of one domain inside the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPaths {
    /// STATE/domains/NAME.
    pub dir: PathBuf,
    /// The lock file taken with flock(2) by every command that changes the domain.
    pub lock: PathBuf,
    /// QMP monitor used by commands holding the domain lock.
    pub qmp_socket: PathBuf,
    /// QMP monitor used by lock-free read-only commands, so `list` and
    /// `domblkstat` never queue behind a long snapshot holding `qmp_socket`.
    pub query_socket: PathBuf,
    /// QEMU's pid file.
    pub pid_file: PathBuf,
    /// The guest console (first serial port).
    pub serial_log: PathBuf,
    /// QEMU's stderr captured while it starts.
    pub stderr_log: PathBuf,
}

impl StateDir {
    /// Where the state lives when neither `--state-dir` nor `VMSNAP_STATE_DIR`
    /// says: /var/lib/vmsnap for root, `$XDG_DATA_HOME/vmsnap` (or
    /// `~/.local/share/vmsnap`) for everyone else.
    pub fn default_root() -> Result<PathBuf> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        default_root_for(
            euid,
            std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        )
    }

    /// Opens the state directory at `root` (or the default), creating it with
    /// mode 0700 if it does not exist. An existing directory's mode is left alone.
    pub fn open(root: Option<&Path>) -> Result<StateDir> {
        let root = match root {
            Some(root) => root.to_path_buf(),
            None => Self::default_root()?,
        };
        let root = std::path::absolute(&root)
            .map_err(|e| Error::io("resolve state directory", &root, e))?;
        create_private_dir(&root)?;
        // The state directory itself may be the user's to share (an
        // existing folder named with --state-dir); everything vmsnap keeps
        // lives below `domains/`, which is vmsnap's alone and made private
        // even if someone created it first.
        let domains = root.join("domains");
        create_private_dir(&domains)?;
        let mode = fs::metadata(&domains)
            .map_err(|e| Error::io("inspect", &domains, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&domains, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("set mode 0700 on", &domains, e))?;
        }
        Ok(StateDir { root })
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite metadata store.
    pub fn database_path(&self) -> PathBuf {
        self.root.join("vmsnap.db")
    }

    /// Where one domain's runtime files live. The name must already have
    /// passed [`crate::config::check_name`].
    pub fn domain_paths(&self, name: &str) -> DomainPaths {
        let dir = self.root.join("domains").join(name);
        DomainPaths {
            lock: dir.join("lock"),
            qmp_socket: dir.join("qmp.sock"),
            query_socket: dir.join("query.sock"),
            pid_file: dir.join("qemu.pid"),
            serial_log: dir.join("serial.log"),
            stderr_log: dir.join("qemu.stderr"),
            dir,
        }
    }
}

impl DomainPaths {
    /// Creates the domain directory (0700) if needed.
    pub fn create(&self) -> Result<()> {
        create_private_dir(&self.dir)
    }

    /// Refuses socket paths the kernel cannot bind, with a hint, instead of
    /// letting QEMU fail with a cryptic message.
    pub fn check_socket_paths(&self) -> Result<()> {
        for socket in [&self.qmp_socket, &self.query_socket] {
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(Error::StateDir {
                    reason: format!(
                        "socket path {} is {len} bytes, more than the {MAX_SOCKET_PATH} a unix socket allows; \
                         use a shorter --state-dir",
                        socket.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes what a QEMU that is gone may have left: pid file and sockets.
    /// Missing files are fine.
    pub fn remove_runtime_files(&self) -> Result<()> {
        for path in [&self.pid_file, &self.qmp_socket, &self.query_socket] {
            remove_if_present(path)?;
        }
        Ok(())
    }
}

/// The default state directory for a user id and its XDG_DATA_HOME and HOME
/// (a relative XDG_DATA_HOME is ignored, as the XDG spec requires).
fn default_root_for(
    euid: u32,
    xdg_data_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Result<PathBuf> {
    if euid == 0 {
        return Ok(PathBuf::from("/var/lib/vmsnap"));
    }
    if let Some(xdg) = xdg_data_home.filter(|p| p.is_absolute()) {
        return Ok(xdg.join("vmsnap"));
    }
    match home {
        Some(home) if home.is_absolute() => Ok(home.join(".local/share/vmsnap")),
        _ => Err(Error::StateDir {
            reason:
                "neither XDG_DATA_HOME nor HOME is set to an absolute path; pass --state-dir DIR \
                     or set VMSNAP_STATE_DIR"
                    .into(),
        }),
    }
}

/// Removes a file, treating "already gone" as success.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Creates `dir` and missing parents with mode 0700 (applied explicitly so the
/// caller's umask cannot widen it).
fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("set mode 0700 on", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_private_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/state");
        let state = StateDir::open(Some(&root)).unwrap();
        assert_eq!(state.root(), root);
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let paths = state.domain_paths("demo");
        paths.create().unwrap();
        assert_eq!(
            fs::metadata(&paths.dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(paths.qmp_socket, root.join("domains/demo/qmp.sock"));
        assert_eq!(state.database_path(), root.join("vmsnap.db"));
    }

    #[test]
    fn a_shared_domains_folder_made_by_someone_else_becomes_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        fs::create_dir_all(root.join("domains")).unwrap();
        for dir in [&root, &root.join("domains")] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        StateDir::open(Some(&root)).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("domains")), 0o700);
        assert_eq!(mode(&root), 0o755, "the folder the user named is theirs");
    }

    #[test]
    fn default_root_follows_user_and_xdg() {
        let home = Some(PathBuf::from("/home/u"));
        let xdg = Some(PathBuf::from("/data"));
        assert_eq!(
            default_root_for(0, xdg.clone(), home.clone()).unwrap(),
            Path::new("/var/lib/vmsnap")
        );
        assert_eq!(
            default_root_for(1000, xdg, home.clone()).unwrap(),
            Path::new("/data/vmsnap")
        );
        assert_eq!(
            default_root_for(1000, Some("relative".into()), home.clone()).unwrap(),
            Path::new("/home/u/.local/share/vmsnap")
        );
        assert_eq!(
            default_root_for(1000, None, home).unwrap(),
            Path::new("/home/u/.local/share/vmsnap")
        );
        assert!(default_root_for(1000, None, None).is_err());
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(&tmp.path().join("x".repeat(100)))).unwrap();
        let err = state.domain_paths("demo").check_socket_paths().unwrap_err();
        assert!(err.to_string().contains("shorter --state-dir"), "{err}");
    }
}
