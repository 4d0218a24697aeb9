//! Whether a guest can really run under KVM here, for `accel = "auto"`.
//!
//! `/dev/kvm` existing is not enough: some hosts (nested or emulated KVM)
//! accept the ioctls yet offer a CPU on which a Linux guest hangs at boot.
//! The probe asks KVM which CPUID features it can give a guest and requires
//! those of QEMU's baseline `qemu64` model (every x86-64 CPU since 2004 has
//! them, so a real KVM always offers them), then runs a four-instruction
//! real-mode guest to its `hlt`. Anything short of that means TCG.

use std::sync::OnceLock;

/// How long the tiny guest may take before KVM is judged unusable.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether KVM can run a guest on this host (probed once per process).
pub fn guest_can_run() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let (done, wait) = std::sync::mpsc::channel();
        // A KVM that never returns from KVM_RUN must not hang the caller.
        std::thread::spawn(move || {
            let _ = done.send(probe::run().is_ok());
        });
        wait.recv_timeout(PROBE_TIMEOUT).unwrap_or(false)
    })
}

/// A CPUID leaf's output as KVM reports it (`struct kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidEntry {
    /// The leaf (EAX input).
    pub function: u32,
    /// The sub-leaf (ECX input).
    pub index: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// Feature bits of QEMU's `qemu64` CPU model: (leaf, register, bit, name).
/// SVM, which `qemu64` also lists, is left out: Intel hosts never have it
/// and QEMU drops it there without harm.
const QEMU64_FEATURES: &[(u32, Register, u32, &str)] = &[
    (1, Register::Edx, 0, "fpu"),
    (1, Register::Edx, 2, "de"),
    (1, Register::Edx, 3, "pse"),
    (1, Register::Edx, 4, "tsc"),
    (1, Register::Edx, 5, "msr"),
    (1, Register::Edx, 6, "pae"),
    (1, Register::Edx, 7, "mce"),
    (1, Register::Edx, 8, "cx8"),
    (1, Register::Edx, 9, "apic"),
    (1, Register::Edx, 11, "sep"),
    (1, Register::Edx, 12, "mtrr"),
    (1, Register::Edx, 13, "pge"),
    (1, Register::Edx, 14, "mca"),
    (1, Register::Edx, 15, "cmov"),
    (1, Register::Edx, 16, "pat"),
    (1, Register::Edx, 17, "pse36"),
    (1, Register::Edx, 19, "clflush"),
    (1, Register::Edx, 23, "mmx"),
    (1, Register::Edx, 24, "fxsr"),
    (1, Register::Edx, 25, "sse"),
    (1, Register::Edx, 26, "sse2"),
    (1, Register::Ecx, 0, "pni"),
    (1, Register::Ecx, 13, "cx16"),
    (0x8000_0001, Register::Edx, 11, "syscall"),
    (0x8000_0001, Register::Edx, 20, "nx"),
    (0x8000_0001, Register::Edx, 29, "lm"),
    (0x8000_0001, Register::Ecx, 0, "lahf_lm"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Ecx,
    Edx,
}

/// The `qemu64` features missing from what KVM offers (empty: all there).
pub fn missing_baseline_features(entries: &[CpuidEntry]) -> Vec<&'static str> {
    QEMU64_FEATURES
        .iter()
        .filter(|(leaf, register, bit, _)| {
            let value = entries
                .iter()
                .find(|e| e.function == *leaf && e.index == 0)
                .map_or(0, |e| match register {
                    Register::Ecx => e.ecx,
                    Register::Edx => e.edx,
                });
            value & (1 << bit) == 0
        })
        .map(|(_, _, _, name)| *name)
        .collect()
}

mod probe {
    //! The ioctls (linux/kvm.h), for x86-64 only.

    use std::fs::OpenOptions;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::{missing_baseline_features, CpuidEntry};

    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
    const KVM_GET_SUPPORTED_CPUID: libc::c_ulong = 0xC008_AE05;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
    const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
    const KVM_RUN: libc::c_ulong = 0xAE80;
    const KVM_SET_REGS: libc::c_ulong = 0x4090_AE82;
    const KVM_GET_SREGS: libc::c_ulong = 0x8138_AE83;
    const KVM_SET_SREGS: libc::c_ulong = 0x4138_AE84;
    const KVM_EXIT_IO: u32 = 2;
    const KVM_EXIT_HLT: u32 = 5;
    /// `mov al, 42; out 0x10, al; hlt`.
    const GUEST_CODE: [u8; 5] = [0xB0, 42, 0xE6, 0x10, 0xF4];
    const CPUID_ENTRIES: usize = 256;
    const CPUID_ENTRY_SIZE: usize = 40;

    fn ioctl(fd: &OwnedFd, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<i32> {
        // SAFETY: every request passed here takes either an integer or a
        // pointer to a live buffer of the size its number encodes.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn new_fd(fd: i32) -> OwnedFd {
        // SAFETY: `fd` was just returned by a successful KVM ioctl and is ours.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn refused(what: &str) -> io::Error {
        io::Error::other(what.to_string())
    }

    /// An anonymous or file mapping, unmapped on drop.
    struct Mapping {
        addr: *mut libc::c_void,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize, fd: Option<&OwnedFd>) -> io::Result<Mapping> {
            let (flags, raw) = match fd {
                Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
                None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            };
            // SAFETY: a fresh mapping; nothing else refers to its range.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    raw,
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Mapping { addr, len })
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is `len` bytes, readable and writable, and
            // borrowed mutably through `self`.
            unsafe { std::slice::from_raw_parts_mut(self.addr.cast::<u8>(), self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly what `new` mapped.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }

    fn supported_cpuid(kvm: &OwnedFd) -> io::Result<Vec<CpuidEntry>> {
        let mut buf = vec![0u8; 8 + CPUID_ENTRIES * CPUID_ENTRY_SIZE];
        buf[..4].copy_from_slice(&(CPUID_ENTRIES as u32).to_ne_bytes());
        ioctl(
            kvm,
            KVM_GET_SUPPORTED_CPUID,
            buf.as_mut_ptr() as libc::c_ulong,
        )?;
        let count = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        Ok((0..count.min(CPUID_ENTRIES))
            .map(|i| {
                let at = 8 + i * CPUID_ENTRY_SIZE;
                CpuidEntry {
                    function: word(at),
                    index: word(at + 4),
                    ebx: word(at + 16),
                    ecx: word(at + 20),
                    edx: word(at + 24),
                }
            })
            .collect())
    }

    /// Runs the probe; any error means "use TCG".
    pub(super) fn run() -> io::Result<()> {
        let kvm: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")?
            .into();
        if ioctl(&kvm, KVM_GET_API_VERSION, 0)? != 12 {
            return Err(refused("unexpected KVM API version"));
        }
        if !missing_baseline_features(&supported_cpuid(&kvm)?).is_empty() {
            return Err(refused("KVM lacks baseline x86-64 features"));
        }
        let vm = new_fd(ioctl(&kvm, KVM_CREATE_VM, 0)?);
        let mut memory = Mapping::new(0x1000, None)?;
        memory.bytes()[..GUEST_CODE.len()].copy_from_slice(&GUEST_CODE);
        // struct kvm_userspace_memory_region: slot, flags, guest address, size, host address.
        let mut region = Vec::with_capacity(32);
        region.extend_from_slice(&0u32.to_ne_bytes());
        region.extend_from_slice(&0u32.to_ne_bytes());
        region.extend_from_slice(&0u64.to_ne_bytes());
        region.extend_from_slice(&0x1000u64.to_ne_bytes());
        region.extend_from_slice(&(memory.addr as u64).to_ne_bytes());
        ioctl(
            &vm,
            KVM_SET_USER_MEMORY_REGION,
            region.as_ptr() as libc::c_ulong,
        )?;
        let vcpu = new_fd(ioctl(&vm, KVM_CREATE_VCPU, 0)?);
        let run_size = ioctl(&kvm, KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
        let mut run = Mapping::new(run_size, Some(&vcpu))?;
        // Real mode at 0:0: code segment base and selector zero.
        let mut sregs = [0u8; 0x138];
        ioctl(&vcpu, KVM_GET_SREGS, sregs.as_mut_ptr() as libc::c_ulong)?;
        sregs[..8].copy_from_slice(&0u64.to_ne_bytes());
        sregs[12..14].copy_from_slice(&0u16.to_ne_bytes());
        ioctl(&vcpu, KVM_SET_SREGS, sregs.as_ptr() as libc::c_ulong)?;
        // struct kvm_regs: 16 general registers, rip, rflags (bit 1 is reserved-set).
        let mut regs = [0u8; 0x90];
        regs[0x88..].copy_from_slice(&2u64.to_ne_bytes());
        ioctl(&vcpu, KVM_SET_REGS, regs.as_ptr() as libc::c_ulong)?;
        let mut wrote_42 = false;
        for _ in 0..4 {
            ioctl(&vcpu, KVM_RUN, 0)?;
            let state = run.bytes();
            let exit = u32::from_ne_bytes(state[8..12].try_into().expect("4 bytes"));
            match exit {
                KVM_EXIT_IO => {
                    // struct kvm_run.io at 32: direction, size, port, count, data offset.
                    let port = u16::from_ne_bytes(state[34..36].try_into().expect("2 bytes"));
                    let offset =
                        u64::from_ne_bytes(state[40..48].try_into().expect("8 bytes")) as usize;
                    wrote_42 = port == 0x10 && state.get(offset) == Some(&42);
                }
                KVM_EXIT_HLT if wrote_42 => return Ok(()),
                _ => break,
            }
        }
        Err(refused("the probe guest did not run as written"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            ebx: 0,
            ecx,
            edx,
        }
    }

    #[test]
    fn a_real_cpu_has_every_baseline_feature() {
        // Leaf 1 and 0x80000001 of an ordinary x86-64 host, as KVM reports them.
        let host = [
            entry(1, 0xf6fa_3203, 0x178b_fbff),
            entry(0x8000_0001, 0x0000_0121, 0x2c10_0800),
        ];
        assert_eq!(missing_baseline_features(&host), Vec::<&str>::new());
    }

    #[test]
    fn a_kvm_without_sse3_or_long_mode_is_not_usable() {
        // What an emulated KVM reported on a machine whose guests hang.
        let emulated = [
            entry(1, 0x8120_2000, 0x078b_fbff),
            entry(0x8000_0001, 0x0040_0393, 0x23d3_fbff),
        ];
        assert_eq!(missing_baseline_features(&emulated), vec!["pni"]);
        assert!(missing_baseline_features(&[entry(1, 0xf6fa_3203, 0x178b_fbff)]).contains(&"lm"));
        assert_eq!(missing_baseline_features(&[]).len(), QEMU64_FEATURES.len());
    }

    #[test]
    fn the_probe_answers_promptly_whatever_the_host() {
        let started = std::time::Instant::now();
        guest_can_run();
        assert!(started.elapsed() < PROBE_TIMEOUT + std::time::Duration::from_secs(1));
    }
}
