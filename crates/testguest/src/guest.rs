//! The synchronous driver of the guest's control channel (protocol in
//! guest/README.md).
//!
//! Every request carries an id made of a per-connection nonce and a counter;
//! replies whose id is not the pending one are dropped. That is what makes a
//! reconnect safe: after a memory revert the guest may still answer a request
//! from before the snapshot, or echo bytes that were in its UART, and none of
//! that can be taken for the answer to a new request.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::pattern::check_range;
use crate::Error;

/// Default time a single request may take before [`Error::Timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Extra time allowed per MiB moved by `write_pattern`/`disk_checksum`: the
/// guest generates and hashes data in busybox under TCG (~0.2 s/MiB measured).
const TIME_PER_MIB: Duration = Duration::from_secs(2);

/// How long one resynchronising ping waits before it is sent again.
const PING_RETRY: Duration = Duration::from_millis(300);

/// Longest value `set_ram_value` accepts; keeps requests well under the
/// guest's line limits.
pub const MAX_RAM_VALUE_LEN: usize = 1024;

/// One disk the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// Kernel name: vda, vdb...
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// A connection to a running test guest's control channel.
#[derive(Debug)]
pub struct Guest {
    path: PathBuf,
    stream: UnixStream,
    buffer: Vec<u8>,
    nonce: String,
    next_id: u64,
    call_timeout: Duration,
    boot_id: String,
}

impl Guest {
    /// Connects to the control socket at `sock_path` and waits until the guest
    /// answers a ping; waits for the socket to appear and for the guest to
    /// boot, all within `timeout`. Works equally for a fresh boot and for a
    /// guest whose memory was just restored into a new QEMU.
    pub fn connect(sock_path: impl AsRef<Path>, timeout: Duration) -> Result<Guest, Error> {
        let path = sock_path.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        let stream = connect_socket(&path, deadline, timeout)?;
        let mut guest = Guest {
            path,
            stream,
            buffer: Vec::new(),
            nonce: fresh_nonce(),
            next_id: 0,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            boot_id: String::new(),
        };
        guest.resync(deadline, timeout)?;
        Ok(guest)
    }

    /// Drops the current connection and connects again to `sock_path` (the
    /// new QEMU's socket after a revert, or the same path), resynchronising as
    /// [`Guest::connect`] does.
    pub fn reconnect(
        &mut self,
        sock_path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let call_timeout = self.call_timeout;
        *self = Guest::connect(sock_path, timeout)?;
        self.call_timeout = call_timeout;
        Ok(())
    }

    /// Sets the base timeout of each request (default [`DEFAULT_CALL_TIMEOUT`]);
    /// data-moving requests get extra time per MiB on top.
    pub fn set_call_timeout(&mut self, timeout: Duration) {
        self.call_timeout = timeout;
    }

    /// The control socket this driver talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The guest kernel's boot id, as of the last ping: it survives a memory
    /// snapshot and revert, and changes when the guest reboots.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Round trip to the guest; returns its boot id.
    pub fn ping(&mut self) -> Result<String, Error> {
        let payload = self.call("ping", self.call_timeout)?;
        let boot_id = parse_pong(&self.path, "ping", &payload)?;
        self.boot_id = boot_id.clone();
        Ok(boot_id)
    }

    /// Writes the seed's pattern (see [`crate::pattern_bytes`]) to
    /// `offset..offset+len` of guest disk `disk` with O_DIRECT and fsync: when
    /// this returns, the host image holds the data.
    pub fn write_pattern(
        &mut self,
        disk: &str,
        offset: u64,
        len: u64,
        seed: u64,
    ) -> Result<(), Error> {
        check_disk_name(disk)?;
        check_range(offset, len)?;
        let request = format!("write {disk} {offset} {len} {seed:016x}");
        let payload = self.call(&request, self.data_timeout(len))?;
        expect_empty(&self.path, &request, &payload)
    }

    /// sha256 (lowercase hex) of `offset..offset+len` of guest disk `disk`, read
    /// with O_DIRECT after dropping the guest's page cache, so it reflects the
    /// disk, not the guest's memory.
    pub fn disk_checksum(&mut self, disk: &str, offset: u64, len: u64) -> Result<String, Error> {
        check_disk_name(disk)?;
        check_range(offset, len)?;
        let request = format!("sum {disk} {offset} {len}");
        let payload = self.call(&request, self.data_timeout(len))?;
        if payload.len() == 64 && payload.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(payload)
        } else {
            Err(protocol(&self.path, &request, &payload))
        }
    }

    /// Stores `value` in the guest's RAM (a file in its RAM-backed root), so
    /// a memory snapshot captures it. Printable text without control
    /// characters, at most [`MAX_RAM_VALUE_LEN`] bytes.
    pub fn set_ram_value(&mut self, value: &str) -> Result<(), Error> {
        if value.len() > MAX_RAM_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(Error::InvalidArgument(format!(
                "RAM value must be at most {MAX_RAM_VALUE_LEN} bytes without control characters, got {value:?}"
            )));
        }
        let request = format!("set {value}");
        let payload = self.call(&request, self.call_timeout)?;
        expect_empty(&self.path, "set", &payload)
    }

    /// The value last stored with [`Guest::set_ram_value`] (empty after boot).
    pub fn ram_value(&mut self) -> Result<String, Error> {
        self.call("get", self.call_timeout)
    }

    /// Guest uptime in centiseconds: grows only while the guest runs, and
    /// continues from the snapshot's value after a memory revert.
    pub fn counter(&mut self) -> Result<u64, Error> {
        let payload = self.call("counter", self.call_timeout)?;
        payload
            .parse()
            .map_err(|_| protocol(&self.path, "counter", &payload))
    }

    /// The guest's virtio disks (vda, vdb... in device order) with sizes.
    pub fn disks(&mut self) -> Result<Vec<GuestDisk>, Error> {
        let payload = self.call("disks", self.call_timeout)?;
        payload
            .split_whitespace()
            .map(|entry| {
                let (name, size) = entry.split_once('=')?;
                Some(GuestDisk {
                    name: name.to_string(),
                    size: size.parse().ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| protocol(&self.path, "disks", &payload))
    }

    /// Asks the guest to power off at once (after `sync`); QEMU then exits
    /// (or stops, with `-no-shutdown`). The reply comes before the power-off.
    pub fn poweroff(&mut self) -> Result<(), Error> {
        let payload = self.call("poweroff", self.call_timeout)?;
        expect_empty(&self.path, "poweroff", &payload)
    }

    fn data_timeout(&self, len: u64) -> Duration {
        let mib = u32::try_from(len.div_ceil(1 << 20)).unwrap_or(u32::MAX);
        self.call_timeout
            .saturating_add(TIME_PER_MIB.saturating_mul(mib))
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.nonce, self.next_id)
    }

    /// Sends one request and returns the payload of its `ok` reply.
    fn call(&mut self, request: &str, timeout: Duration) -> Result<String, Error> {
        let id = self.fresh_id();
        self.send(&format!("{id} {request}\n"))?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_line(deadline, request)? {
                Some(line) => {
                    if let Some(reply) = match_reply(&id, &line) {
                        return reply.map_err(|message| Error::GuestRejected {
                            path: self.path.clone(),
                            request: request.to_string(),
                            message,
                        });
                    }
                }
                None => {
                    return Err(Error::Timeout {
                        path: self.path.clone(),
                        request: request.to_string(),
                        waited: timeout,
                    })
                }
            }
        }
    }

    /// Pings until an `ok pong` with this connection's id arrives. The
    /// leading newline ends any half line a previous client left in the
    /// guest's buffer; the guest ignores empty lines and answers garbage with
    /// an error, which is dropped whatever its id.
    fn resync(&mut self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        let id = self.fresh_id();
        let probe = format!("\n{id} ping\n");
        loop {
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    path: self.path.clone(),
                    waited: timeout,
                });
            }
            self.send(&probe)?;
            let retry_at = (Instant::now() + PING_RETRY).min(deadline);
            while let Some(line) = self.read_line(retry_at, "ping")? {
                // An `err` under our id answers a probe the guest received
                // truncated (bytes lost while its UART was being opened):
                // noise, like everything else until a whole pong.
                if let Some(Ok(payload)) = match_reply(&id, &line) {
                    self.boot_id = parse_pong(&self.path, "ping", &payload)?;
                    return Ok(());
                }
            }
        }
    }

    fn send(&mut self, data: &str) -> Result<(), Error> {
        self.stream.write_all(data.as_bytes()).map_err(|source| {
            if is_disconnect(&source) {
                Error::Disconnected {
                    path: self.path.clone(),
                    request: data.trim().to_string(),
                }
            } else {
                Error::Io {
                    op: "write to guest control socket",
                    path: self.path.clone(),
                    source,
                }
            }
        })
    }

    /// Next complete line (without `\r`/`\n`), or `None` at `deadline`.
    fn read_line(&mut self, deadline: Instant, request: &str) -> Result<Option<String>, Error> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_matches(['\r', '\n']).to_string()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|source| Error::Io {
                    op: "set read timeout on",
                    path: self.path.clone(),
                    source,
                })?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Disconnected {
                        path: self.path.clone(),
                        request: request.to_string(),
                    })
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) if is_disconnect(&source) => {
                    return Err(Error::Disconnected {
                        path: self.path.clone(),
                        request: request.to_string(),
                    })
                }
                Err(source) => {
                    return Err(Error::Io {
                        op: "read from guest control socket",
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

fn connect_socket(path: &Path, deadline: Instant, timeout: Duration) -> Result<UnixStream, Error> {
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(Error::NotReady {
                        path: path.to_path_buf(),
                        waited: timeout,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Io {
                    op: "connect to guest control socket",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// `Some(Ok(payload))` / `Some(Err(message))` when `line` answers request
/// `id`; `None` for anything else (other ids, echoes, the ready banner).
fn match_reply(id: &str, line: &str) -> Option<Result<String, String>> {
    let rest = line.strip_prefix(id)?.strip_prefix(' ')?;
    let (status, payload) = rest.split_once(' ').unwrap_or((rest, ""));
    match status {
        "ok" => Some(Ok(payload.to_string())),
        "err" => Some(Err(payload.to_string())),
        _ => None,
    }
}

fn parse_pong(path: &Path, request: &str, payload: &str) -> Result<String, Error> {
    match payload.split_once(' ') {
        Some(("pong", boot_id)) if !boot_id.is_empty() => Ok(boot_id.to_string()),
        _ => Err(protocol(path, request, payload)),
    }
}

fn expect_empty(path: &Path, request: &str, payload: &str) -> Result<(), Error> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(protocol(path, request, payload))
    }
}

fn protocol(path: &Path, request: &str, payload: &str) -> Error {
    Error::Protocol {
        path: path.to_path_buf(),
        request: request.to_string(),
        reply: payload.to_string(),
    }
}

fn check_disk_name(disk: &str) -> Result<(), Error> {
    let letters = disk.strip_prefix("vd").unwrap_or("");
    if (1..=2).contains(&letters.len()) && letters.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "disk name {disk:?} is not a virtio disk name like vda or vdb"
        )))
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// A nonce unique to this connection (process id, time, per-process counter),
/// so no reply meant for an earlier connection can match.
fn fresh_nonce() -> String {
    static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let count = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    format!(
        "h{:x}x{:x}x{count:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_match_only_their_own_id() {
        assert_eq!(
            match_reply("a-1", "a-1 ok pong x"),
            Some(Ok("pong x".into()))
        );
        assert_eq!(match_reply("a-1", "a-1 ok"), Some(Ok(String::new())));
        assert_eq!(match_reply("a-1", "a-1 ok "), Some(Ok(String::new())));
        assert_eq!(match_reply("a-1", "a-1 err no"), Some(Err("no".into())));
        assert_eq!(match_reply("a-1", "a-10 ok"), None);
        assert_eq!(match_reply("a-1", "a-1 ping"), None);
        assert_eq!(match_reply("a-1", "* ready b"), None);
    }

    #[test]
    fn disk_names() {
        assert!(check_disk_name("vda").is_ok());
        assert!(check_disk_name("vdab").is_ok());
        assert!(check_disk_name("sda").is_err());
        assert!(check_disk_name("vd").is_err());
        assert!(check_disk_name("vda; reboot").is_err());
    }
}
