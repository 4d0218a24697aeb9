//! The per-domain lock: flock(2) on STATE/domains/NAME/lock.
//!
//! Every command that changes a domain (start, snapshot, destroy, ...) holds
//! it for its whole run, so two vmsnap processes never interleave QMP
//! conversations or metadata updates on one domain. flock is tied to the open
//! file, so the kernel releases it when vmsnap exits for any reason, SIGKILL
//! included: a crashed vmsnap never leaves a domain locked. The file is opened
//! close-on-exec, so QEMU (which outlives vmsnap) never inherits it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::state::DomainPaths;

/// Whether to wait for a busy domain or fail at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Fail with [`Error::Busy`] if another process holds the lock.
    Fail,
    /// Block until the other process releases it (the CLI's `--wait`).
    Wait,
}

/// Proof that this process holds a domain's exclusive lock; released on drop.
/// Operations that change a domain take `&DomainLock` so they cannot be
/// called without it.
#[derive(Debug)]
pub struct DomainLock {
    file: File,
    domain: String,
}

impl DomainLock {
    /// Takes the lock of `domain`, whose files live at `paths`. The domain
    /// directory must exist.
    pub fn acquire(domain: &str, paths: &DomainPaths, wait: LockWait) -> Result<DomainLock> {
        loop {
            let file = open_lock_file(&paths.lock)?;
            let mut op = libc::LOCK_EX;
            if wait == LockWait::Fail {
                op |= libc::LOCK_NB;
            }
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error::Busy {
                        name: domain.to_string(),
                        holder: holder_of(&paths.lock),
                    });
                }
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("lock", &paths.lock, err));
            }
            // The holder we waited for may have removed the file (undefine);
            // a lock on an unlinked inode protects nothing, so start over.
            if !same_inode(&file, &paths.lock) {
                if !paths.dir.is_dir() {
                    return Err(Error::DomainNotFound {
                        name: domain.to_string(),
                    });
                }
                continue;
            }
            let mut lock = DomainLock {
                file,
                domain: domain.to_string(),
            };
            lock.record_holder();
            return Ok(lock);
        }
    }

    /// Takes the lock only if it is free right now; `None` if busy. Lets
    /// read-only commands tidy up after a dead QEMU without ever waiting.
    pub fn try_acquire(domain: &str, paths: &DomainPaths) -> Result<Option<DomainLock>> {
        match Self::acquire(domain, paths, LockWait::Fail) {
            Ok(lock) => Ok(Some(lock)),
            Err(Error::Busy { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The domain this lock protects.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Checks that this lock is the one for `domain`, so an operation cannot be
    /// handed the lock of another domain by mistake.
    pub fn check(&self, domain: &str) -> Result<()> {
        if self.domain == domain {
            Ok(())
        } else {
            Err(Error::InvalidState {
                name: domain.to_string(),
                action: "change".into(),
                state: "not locked by this command".into(),
                hint: format!("the lock passed belongs to domain '{}'", self.domain),
            })
        }
    }

    /// Writes our pid into the lock file; only informational (for the busy
    /// message), so a failure to write it is ignored.
    fn record_holder(&mut self) {
        let pid = std::process::id();
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(format!("{pid}\n").as_bytes())
        };
        let _ = write(&mut self.file);
    }
}

impl Drop for DomainLock {
    /// Unlocks explicitly rather than by closing: a process forked meanwhile
    /// (QEMU, qemu-img) shares the open file until it execs, and would keep
    /// the lock held past the end of the command otherwise.
    fn drop(&mut self) {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::io("open lock file (is the domain defined?)", path, e)
            } else {
                Error::io("open lock file", path, e)
            }
        })
}

fn same_inode(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.ino() == named.ino() && open.dev() == named.dev(),
        _ => false,
    }
}

fn holder_of(path: &Path) -> String {
    let mut text = String::new();
    let read = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    match read.ok().and_then(|_| text.trim().parse::<u32>().ok()) {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::state::StateDir;
    use std::time::{Duration, Instant};

    #[test]
    fn second_lock_is_busy_and_names_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(tmp.path())).unwrap();
        let paths = state.domain_paths("demo");
        paths.create().unwrap();
        let first = DomainLock::acquire("demo", &paths, LockWait::Fail).unwrap();
        let err = DomainLock::acquire("demo", &paths, LockWait::Fail).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Busy);
        assert_eq!(
            err.to_string(),
            format!(
                "domain demo is busy: another vmsnap command (pid {}) is working on it; retry or pass --wait",
                std::process::id()
            )
        );
        assert!(DomainLock::try_acquire("demo", &paths).unwrap().is_none());
        drop(first);
        assert!(DomainLock::try_acquire("demo", &paths).unwrap().is_some());
    }

    #[test]
    fn wait_blocks_until_release() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(tmp.path())).unwrap();
        let paths = state.domain_paths("demo");
        paths.create().unwrap();
        let first = DomainLock::acquire("demo", &paths, LockWait::Fail).unwrap();
        let started = Instant::now();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let _second = DomainLock::acquire("demo", &paths, LockWait::Wait).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        releaser.join().unwrap();
    }
}
