//! A minimal QEMU launcher for tests of crates that have no domain layer: it
//! starts `qemu-system-x86_64` with exactly the command-line contract of
//! guest/README.md and kills it when dropped, so a failing test leaves no VM.

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{guest_initrd, guest_kernel, Error, Guest};

/// Kernel command line the test guest is meant to boot with: console on the
/// first serial port, and a panic powers the VM off instead of hanging it.
pub const GUEST_KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1";

/// How long `launch` waits for QEMU to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Image format of a disk given to [`QemuGuestBuilder::disk`]; always explicit,
/// never probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl DiskFormat {
    /// The QEMU block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Options of a [`QemuGuest`] before it starts.
#[derive(Debug, Clone)]
pub struct QemuGuestBuilder {
    run_dir: PathBuf,
    disks: Vec<(PathBuf, DiskFormat)>,
    memory_mib: u32,
    incoming_defer: bool,
    extra_args: Vec<String>,
}

impl QemuGuestBuilder {
    /// Adds a virtio-blk disk; the first is vda, the next vdb, and so on. Its
    /// nodes are named `f<N>` (file) and `d<N>` (format), N from 0.
    pub fn disk(mut self, path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        self.disks.push((path.into(), format));
        self
    }

    /// Guest RAM in MiB (default 256).
    pub fn memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Starts QEMU with `-incoming defer`, to load a saved memory state with
    /// QMP `migrate-incoming` and then `cont`.
    pub fn incoming_defer(mut self) -> Self {
        self.incoming_defer = true;
        self
    }

    /// Appends a raw QEMU argument (after the contract's own).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// The full argument list QEMU will get (without the program name).
    pub fn args(&self) -> Result<Vec<String>, Error> {
        let kernel = guest_kernel()?;
        let initrd = guest_initrd()?;
        let dir = &self.run_dir;
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            GUEST_KERNEL_CMDLINE.into(),
            "-serial".into(),
            format!("file:{}", opt_path(&dir.join(CONSOLE_LOG))),
            "-chardev".into(),
            format!(
                "socket,id=ctl,path={},server=on,wait=off",
                opt_path(&dir.join(CTL_SOCKET))
            ),
            "-device".into(),
            "isa-serial,chardev=ctl".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                opt_path(&dir.join(QMP_SOCKET))
            ),
        ];
        for (index, (path, format)) in self.disks.iter().enumerate() {
            args.push("-blockdev".into());
            args.push(format!(
                "driver=file,filename={},node-name=f{index}",
                opt_path(path)
            ));
            args.push("-blockdev".into());
            args.push(format!(
                "driver={},file=f{index},node-name=d{index}",
                format.driver()
            ));
            args.push("-device".into());
            args.push(format!("virtio-blk-pci,drive=d{index},id=disk{index}"));
        }
        if self.incoming_defer {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }

    /// Starts QEMU and waits until its control and QMP sockets exist; the
    /// guest itself is still booting (use [`QemuGuest::connect`]).
    pub fn launch(self) -> Result<QemuGuest, Error> {
        let args = self.args()?;
        let dir = self.run_dir.clone();
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            op: "create run directory",
            path: dir.clone(),
            source,
        })?;
        for stale in [CTL_SOCKET, QMP_SOCKET] {
            remove_if_exists(&dir.join(stale))?;
        }
        let stderr_path = dir.join(STDERR_LOG);
        let stderr = fs::File::create(&stderr_path).map_err(|source| Error::Io {
            op: "create",
            path: stderr_path.clone(),
            source,
        })?;
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| Error::QemuSpawn {
                dir: dir.clone(),
                source,
            })?;
        let mut qemu = QemuGuest { dir, child };
        qemu.wait_for_sockets()?;
        qemu.wait_for_qmp_greeting()?;
        Ok(qemu)
    }
}

const CTL_SOCKET: &str = "ctl.sock";
const QMP_SOCKET: &str = "qmp.sock";
const CONSOLE_LOG: &str = "console.log";
const STDERR_LOG: &str = "qemu.stderr";

/// A running `qemu-system-x86_64` with the test guest; killed on drop.
#[derive(Debug)]
pub struct QemuGuest {
    dir: PathBuf,
    child: Child,
}

impl QemuGuest {
    /// Starts describing a VM whose sockets and logs live in `run_dir`
    /// (keep it short: unix socket paths are limited to ~100 bytes).
    pub fn builder(run_dir: impl Into<PathBuf>) -> QemuGuestBuilder {
        QemuGuestBuilder {
            run_dir: run_dir.into(),
            disks: Vec::new(),
            memory_mib: 256,
            incoming_defer: false,
            extra_args: Vec::new(),
        }
    }

    /// The guest's control channel socket (second serial port).
    pub fn ctl_socket(&self) -> PathBuf {
        self.dir.join(CTL_SOCKET)
    }

    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join(QMP_SOCKET)
    }

    /// The guest console (first serial port) log file.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }

    /// The run directory given to [`QemuGuest::builder`].
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects the driver to this VM's control channel, waiting up to
    /// `timeout` for the guest to be ready. If QEMU exits meanwhile, says so
    /// with its stderr rather than timing out.
    pub fn connect(&mut self, timeout: Duration) -> Result<Guest, Error> {
        match Guest::connect(self.ctl_socket(), timeout) {
            Ok(guest) => Ok(guest),
            Err(err) => {
                self.check_running()?;
                Err(err)
            }
        }
    }

    /// Fails with [`Error::QemuExited`] (and QEMU's stderr) if QEMU is gone.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status)),
            Err(source) => Err(Error::Io {
                op: "wait for QEMU in",
                path: self.dir.clone(),
                source,
            }),
        }
    }

    /// Waits up to `timeout` for QEMU to exit by itself (after a guest
    /// power-off or QMP `quit`); `Ok(None)` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if Instant::now() >= deadline => return Ok(None),
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(Error::Io {
                        op: "wait for QEMU in",
                        path: self.dir.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Asks QEMU to exit with SIGTERM (it flushes and closes its images),
    /// then SIGKILLs it if it is still there after `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            if self.child.try_wait().ok().flatten().is_none() {
                // SAFETY: plain kill(2) on our own child's pid, which has not
                // been reaped yet (try_wait above), so it cannot be reused.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        match self.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    /// SIGKILLs QEMU (a crash as the host sees it) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, Error> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child.wait().map_err(|source| Error::Io {
            op: "wait for QEMU in",
            path: self.dir.clone(),
            source,
        })
    }

    fn wait_for_sockets(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        for socket in [self.ctl_socket(), self.qmp_socket()] {
            while !socket.exists() {
                self.check_running()?;
                if Instant::now() >= deadline {
                    return Err(Error::QemuStartTimeout {
                        dir: self.dir.clone(),
                        path: socket,
                        waited: START_TIMEOUT,
                    });
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// QEMU creates its sockets before it opens the disks; it greets a QMP
    /// client only once its machine is fully set up. Waiting for the greeting
    /// turns a bad disk into a launch error with QEMU's message.
    fn wait_for_qmp_greeting(&mut self) -> Result<(), Error> {
        let path = self.qmp_socket();
        let io_error = |op, source| Error::Io {
            op,
            path: path.clone(),
            source,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut stream = loop {
            match UnixStream::connect(&path) {
                Ok(stream) => break stream,
                // Bound but not yet listening: QEMU is still starting.
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    self.check_running()?;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    self.check_running()?;
                    return Err(io_error("connect to QMP socket", e));
                }
            }
        };
        stream
            .set_read_timeout(Some(START_TIMEOUT))
            .map_err(|e| io_error("set read timeout on", e))?;
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => return Ok(()),
                Ok(1) => {}
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::QemuStartTimeout {
                        dir: self.dir.clone(),
                        path,
                        waited: START_TIMEOUT,
                    })
                }
                Err(_) => break,
            }
        }
        // The connection closed without a greeting: QEMU is exiting.
        if let Some(status) = self.wait_exit(Duration::from_secs(5))? {
            return Err(self.exited(status));
        }
        Err(io_error(
            "read QMP greeting from",
            io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the connection"),
        ))
    }

    fn exited(&self, status: ExitStatus) -> Error {
        let stderr = fs::read_to_string(self.dir.join(STDERR_LOG)).unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::QemuExited {
            dir: self.dir.clone(),
            status: status.to_string(),
            stderr: tail.join(" | "),
        }
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            op: "remove stale socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A path as a QEMU option value: commas are doubled so they cannot end it.
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_follows_the_contract() {
        let builder = QemuGuest::builder("/run/x,y")
            .disk("/img/a.qcow2", DiskFormat::Qcow2)
            .disk("/img/b.raw", DiskFormat::Raw)
            .incoming_defer();
        let args = match builder.args() {
            Ok(args) => args,
            // Without a built guest there is no command line to check.
            Err(Error::GuestNotBuilt { .. }) => return,
            Err(other) => panic!("{other}"),
        };
        let line = args.join(" ");
        assert!(
            line.starts_with("-accel tcg -m 256 -nodefaults -display none"),
            "{line}"
        );
        assert!(line.contains("-serial file:/run/x,,y/console.log -chardev socket,id=ctl,path=/run/x,,y/ctl.sock,server=on,wait=off -device isa-serial,chardev=ctl"), "{line}");
        assert!(line.contains("-blockdev driver=file,filename=/img/a.qcow2,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 -device virtio-blk-pci,drive=d0,id=disk0"), "{line}");
        assert!(line.contains("-blockdev driver=file,filename=/img/b.raw,node-name=f1 -blockdev driver=raw,file=f1,node-name=d1 -device virtio-blk-pci,drive=d1,id=disk1"), "{line}");
        assert!(line.ends_with("-incoming defer"), "{line}");
        assert_eq!(
            args[args.iter().position(|a| a == "-append").unwrap() + 1],
            GUEST_KERNEL_CMDLINE
        );
    }
}
