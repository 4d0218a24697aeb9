//! Small helpers for talking to a domain's QEMU: error wrapping, quoting for
//! `exec:` migration URIs, and reading the block graph QEMU really has.

use std::path::{Path, PathBuf};

use vmsnap_qmp::Qmp;

use super::error::{Result, SnapshotError};

/// Wraps a QMP failure with the domain and the command.
pub fn qmp_error(domain: &str, command: &str) -> impl FnOnce(vmsnap_qmp::Error) -> SnapshotError {
    let domain = domain.to_string();
    let command = command.to_string();
    move |source| SnapshotError::Qemu {
        domain,
        command,
        source: Box::new(source),
    }
}

/// The chains QEMU really has open, per device, active layer first: what a
/// recovery adopts when a killed vmsnap left QEMU on layers it never recorded.
pub async fn live_chains(domain: &str, qmp: &Qmp) -> Result<Vec<(String, Vec<(String, PathBuf)>)>> {
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .map_err(qmp_error(domain, "query-named-block-nodes"))?;
    let blocks = qmp
        .query_block()
        .await
        .map_err(qmp_error(domain, "query-block"))?;
    let mut out = Vec::new();
    for block in blocks {
        let Some(inserted) = block.inserted else {
            continue;
        };
        let target = block
            .qdev
            .as_deref()
            .and_then(|q| q.rsplit('/').nth(1).map(str::to_string))
            .filter(|t| !t.is_empty())
            .unwrap_or(block.device.clone());
        let mut layers = vec![(inserted.node_name.clone(), PathBuf::from(&inserted.file))];
        let mut backing = inserted
            .image
            .as_ref()
            .and_then(|i| i.backing_image.clone());
        while let Some(image) = backing {
            let node = nodes
                .iter()
                .find(|n| n.file == image.filename && matches!(n.drv.as_str(), "qcow2" | "raw"))
                .map(|n| n.node_name.clone())
                .unwrap_or_default();
            layers.push((node, PathBuf::from(&image.filename)));
            backing = image.backing_image;
        }
        out.push((target, layers));
    }
    Ok(out)
}

/// Shell-quotes a path for an `exec:` migration URI.
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}

/// A minimal blocking QMP conversation on a monitor socket, for the one
/// thing the async client cannot do: hand QEMU a file descriptor
/// (`getfd`, SCM_RIGHTS). Used for the paused window of an external
/// snapshot, so the memory image is written through `fd:` and QEMU does not
/// fork a shell (which costs tens of milliseconds with a large guest) while
/// the guest is stopped.
pub struct FdMonitor {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    domain: String,
}

impl FdMonitor {
    /// Connects to the monitor at `socket` and leaves capabilities negotiation.
    pub fn connect(domain: &str, socket: &Path) -> Result<FdMonitor> {
        let fail = |what: String| SnapshotError::Qemu {
            domain: domain.to_string(),
            command: "connect".into(),
            source: what.into(),
        };
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| fail(format!("cannot connect to {}: {e}", socket.display())))?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .map_err(|e| fail(e.to_string()))?;
        let reader = std::io::BufReader::new(stream.try_clone().map_err(|e| fail(e.to_string()))?);
        let mut monitor = FdMonitor {
            stream,
            reader,
            domain: domain.to_string(),
        };
        monitor.read_message("greeting")?;
        monitor.execute("qmp_capabilities", serde_json::Value::Null)?;
        Ok(monitor)
    }

    fn error(&self, command: &str, what: String) -> SnapshotError {
        SnapshotError::Qemu {
            domain: self.domain.clone(),
            command: command.to_string(),
            source: what.into(),
        }
    }

    fn read_message(&mut self, command: &str) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| self.error(command, format!("monitor read failed: {e}")))?;
        if n == 0 {
            return Err(self.error(command, "QEMU closed the monitor".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.error(command, format!("bad monitor reply: {e}")))
    }

    /// Sends `command`, optionally with a descriptor, and returns its `return` value.
    fn send(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
        fd: Option<i32>,
    ) -> Result<serde_json::Value> {
        use std::io::Write;
        let mut message = serde_json::json!({"execute": command});
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        match fd {
            None => self
                .stream
                .write_all(line.as_bytes())
                .map_err(|e| self.error(command, format!("monitor write failed: {e}")))?,
            Some(fd) => send_with_fd(&self.stream, line.as_bytes(), fd)
                .map_err(|e| self.error(command, format!("cannot pass the descriptor: {e}")))?,
        }
        loop {
            let reply = self.read_message(command)?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(value) = reply.get("return") {
                return Ok(value.clone());
            }
            let desc = reply
                .pointer("/error/desc")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unexpected reply")
                .to_string();
            return Err(self.error(command, desc));
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.send(command, arguments, None)
    }

    /// Gives QEMU a copy of `file`'s descriptor under `name` (`getfd`).
    pub fn pass_fd(&mut self, name: &str, file: &std::fs::File) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.send(
            "getfd",
            serde_json::json!({"fdname": name}),
            Some(file.as_raw_fd()),
        )
        .map(|_| ())
    }
}

fn send_with_fd(
    stream: &std::os::unix::net::UnixStream,
    data: &[u8],
    fd: i32,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below stays valid for
    // the sendmsg call (iov, control live on this stack frame).
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, fd);
        libc::sendmsg(stream.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(std::io::Error::other("short write on the monitor"));
    }
    Ok(())
}
