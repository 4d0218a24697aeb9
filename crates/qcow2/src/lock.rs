//! Image locking compatible with QEMU's file-posix locks.
//!
//! QEMU takes shared open-file-description locks on single bytes: byte
//! 100 + n while it holds permission n, byte 200 + n while it refuses to share
//! permission n. Taking the same locks means a running QEMU and vmsnap (and
//! qemu-img) refuse to write one image at the same time.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const PERM_RESIZE: u32 = 3;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

fn flock(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_short,
    byte: i64,
) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain data; zeroed is a valid value for every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: the descriptor is valid for the life of `file` and `fl` outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

fn locked_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let fl = flock(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK as libc::c_short,
        byte,
    )?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU-compatible locks for reading (and writing when `writable`).
///
/// The locks live as long as `file` stays open. A conflict is retried for a
/// short while: a descriptor this process just closed can survive for an
/// instant in a child that another thread forked and has not yet exec'd.
pub(crate) fn lock_image(file: &File, path: &Path, writable: bool) -> Result<()> {
    let mut attempt = 0;
    loop {
        match try_lock_image(file, path, writable) {
            Err(Error::Busy { .. }) if attempt < 10 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn try_lock_image(file: &File, path: &Path, writable: bool) -> Result<()> {
    let held: &[u32] = if writable {
        &[PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE]
    } else {
        &[PERM_CONSISTENT_READ]
    };
    let unshared: &[u32] = if writable {
        &[PERM_WRITE, PERM_RESIZE]
    } else {
        &[PERM_WRITE]
    };
    let io = |e| Error::io(path, "lock the image", e);
    for &perm in held {
        if locked_by_other(file, SHARED_BASE + i64::from(perm)).map_err(io)? {
            return Err(Error::Busy {
                path: path.to_path_buf(),
                detail: format!(
                    "another process does not share \"{}\"",
                    PERM_NAMES[perm as usize]
                ),
            });
        }
    }
    for &perm in unshared {
        if locked_by_other(file, PERM_BASE + i64::from(perm)).map_err(io)? {
            return Err(Error::Busy {
                path: path.to_path_buf(),
                detail: format!(
                    "failed to get shared \"{}\" lock",
                    PERM_NAMES[perm as usize]
                ),
            });
        }
    }
    let rd = libc::F_RDLCK as libc::c_short;
    for &perm in held {
        flock(file, libc::F_OFD_SETLK, rd, PERM_BASE + i64::from(perm)).map_err(io)?;
    }
    for &perm in unshared {
        flock(file, libc::F_OFD_SETLK, rd, SHARED_BASE + i64::from(perm)).map_err(io)?;
    }
    Ok(())
}
