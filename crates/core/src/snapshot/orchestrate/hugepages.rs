//! Folding a running guest's RAM back into transparent huge pages before a
//! background memory snapshot, to shorten the guest's pause.
//!
//! QEMU 7.2's background snapshot walks every page of guest RAM inside the
//! pause (populating it, then write-protecting it with userfaultfd). Its
//! write-fault handling splits the huge pages the guest ran on, so every
//! later snapshot walks 262,144 small pages per GiB: about 30 ms for 1 GiB
//! here, against about 8 ms when the RAM is huge pages again. Collapsing them
//! (`MADV_COLLAPSE`, Linux 6.1+, through `process_madvise` on QEMU) happens
//! while the guest runs, before the pause. It is best effort: without the
//! kernel support or the right (CAP_SYS_NICE), the pause is just longer.
//! A domain with `hugepages = true` needs none of this: QEMU walks its RAM in
//! 2 MiB pages, which halves the pause again.

/// An anonymous private mapping of QEMU's, as `/proc/PID/maps` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The mappings that hold guest RAM of `ram_bytes`: anonymous, private,
/// writable, and at least that large but within 2 MiB of it (QEMU aligns
/// its RAM block mapping; nothing else it maps is that size).
pub fn guest_ram_mappings(maps: &str, ram_bytes: u64) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 5 || fields[1] != "rw-p" {
                return None;
            }
            let (start, end) = fields[0].split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let len = end.checked_sub(start)?;
            (len >= ram_bytes && len <= ram_bytes + (2 << 20)).then_some(Mapping { start, end })
        })
        .collect()
}

/// Asks the kernel to collapse QEMU `pid`'s guest RAM into huge pages;
/// returns whether it was done. Takes up to a few hundred milliseconds
/// for a GiB of guest RAM, with the guest running.
pub fn fold_guest_ram(pid: u32, ram_bytes: u64) -> bool {
    const SYS_PIDFD_OPEN: libc::c_long = 434;
    const SYS_PROCESS_MADVISE: libc::c_long = 440;
    const MADV_COLLAPSE: libc::c_int = 25;
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let mappings = guest_ram_mappings(&maps, ram_bytes);
    if mappings.is_empty() {
        return false;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd = unsafe { libc::syscall(SYS_PIDFD_OPEN, pid as libc::c_long, 0) };
    if pidfd < 0 {
        return false;
    }
    let mut folded = true;
    for mapping in mappings {
        let iov = libc::iovec {
            iov_base: mapping.start as *mut libc::c_void,
            iov_len: (mapping.end - mapping.start) as usize,
        };
        // SAFETY: the iovec names QEMU's address range, which the kernel only
        // advises on (it is never dereferenced in this process); `iov`
        // outlives the call.
        let ret = unsafe {
            libc::syscall(
                SYS_PROCESS_MADVISE,
                pidfd,
                &iov as *const libc::iovec,
                1,
                MADV_COLLAPSE,
                0,
            )
        };
        // EINVAL only says some 2 MiB ranges could not be folded (never
        // touched by the guest); the others were.
        if ret < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            folded = false;
        }
    }
    // SAFETY: closes the descriptor pidfd_open returned.
    unsafe { libc::close(pidfd as libc::c_int) };
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0e3b000 r-xp 00000000 fe:00 1312  /usr/bin/qemu-system-x86_64
7f0a40000000-7f0a80000000 rw-p 00000000 00:00 0
7f0a80000000-7f0a80021000 rw-p 00000000 00:00 0
7f0b00000000-7f0b40200000 rw-p 00000000 00:00 0
7f0c00000000-7f0c40000000 rw-s 00000000 00:01 7  /memfd:pc.ram (deleted)
7f0d00000000-7f0d40000000 r--p 00000000 00:00 0
";

    #[test]
    fn only_anonymous_writable_ram_sized_mappings_are_guest_ram() {
        assert_eq!(
            guest_ram_mappings(MAPS, 1 << 30),
            vec![
                Mapping {
                    start: 0x7f0a_4000_0000,
                    end: 0x7f0a_8000_0000
                },
                Mapping {
                    start: 0x7f0b_0000_0000,
                    end: 0x7f0b_4020_0000
                },
            ]
        );
        assert!(guest_ram_mappings(MAPS, 2 << 30).is_empty());
    }

    #[test]
    fn a_process_that_is_gone_is_not_folded() {
        assert!(!fold_guest_ram(u32::MAX >> 1, 1 << 30));
    }
}
