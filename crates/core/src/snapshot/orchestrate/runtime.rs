//! The domain's QEMU as the snapshot code needs it: find out whether it runs,
//! connect to its monitor, start it on explicit image chains (optionally
//! paused or waiting for an incoming memory image), stop it, and read the
//! block graph it really has. A small adapter over the domain layer's
//! command-line builder, so a revert can start QEMU on chains of its choosing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmsnap_qmp::Qmp;

use super::error::{Result, SnapshotError};
use crate::cmdline::{qemu_args, qemu_binary, LaunchOptions};
use crate::config::DomainConfig;
use crate::disk::DiskChain;
use crate::state::DomainPaths;
use crate::store::Store;

/// How long to wait for QEMU's monitor to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a QEMU asked to quit to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

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

/// QEMU's pid from the pid file, if QEMU is alive.
pub fn running_pid(paths: &DomainPaths) -> Option<i32> {
    let text = std::fs::read_to_string(&paths.pid_file).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(pid)
}

/// Connects to the domain's monitor if QEMU runs; `None` when it does not.
pub async fn connect_if_running(domain: &str, paths: &DomainPaths) -> Result<Option<Qmp>> {
    if running_pid(paths).is_none() || !paths.qmp_socket.exists() {
        return Ok(None);
    }
    let qmp = Qmp::connect(&paths.qmp_socket, CONNECT_TIMEOUT)
        .await
        .map_err(qmp_error(domain, "connect"))?;
    Ok(Some(qmp))
}

/// Starts QEMU for `config` on `disks` and connects to its monitor.
pub async fn launch(
    config: &DomainConfig,
    disks: &[DiskChain],
    paths: &DomainPaths,
    store: &Store,
    options: LaunchOptions,
) -> Result<Qmp> {
    let launch_error = |detail: String| SnapshotError::Launch {
        domain: config.name.clone(),
        detail,
    };
    paths.create()?;
    let _ = std::fs::remove_file(&paths.qmp_socket);
    let _ = std::fs::remove_file(&paths.query_socket);
    let args = qemu_args(config, disks, paths, &options)?;
    let stderr = std::fs::File::create(&paths.stderr_log).map_err(|source| SnapshotError::Io {
        action: "cannot create QEMU's log".into(),
        path: paths.stderr_log.clone(),
        source,
    })?;
    let mut command = Command::new(qemu_binary());
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe; it keeps QEMU's sockets and
        // files private to their owner (DESIGN §5.6).
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
    }
    let status = command
        .status()
        .map_err(|e| launch_error(format!("cannot run {}: {e}", qemu_binary())))?;
    if !status.success() {
        let log = std::fs::read_to_string(&paths.stderr_log).unwrap_or_default();
        let log = log
            .lines()
            .filter(|l| !l.contains("warning:"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(launch_error(format!("QEMU exited with {status}: {log}")));
    }
    store.transaction(|tx| crate::store::record_start(tx, &config.name).map(|_| ()))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match Qmp::connect(&paths.qmp_socket, CONNECT_TIMEOUT).await {
            Ok(qmp) => return Ok(qmp),
            Err(err) if Instant::now() >= deadline => {
                return Err(qmp_error(&config.name, "connect")(err))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Makes QEMU exit at once (the guest's state is being replaced or was
/// saved) and waits until the process is gone, so its images are closed.
pub async fn stop_qemu(domain: &str, qmp: Qmp, paths: &DomainPaths) -> Result<()> {
    let pid = running_pid(paths);
    qmp.quit().await.map_err(qmp_error(domain, "quit"))?;
    qmp.close().await;
    if let Some(pid) = pid {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        // SAFETY: signal 0 only probes for the process.
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() >= deadline {
                return Err(SnapshotError::Launch {
                    domain: domain.to_string(),
                    detail: format!("QEMU (pid {pid}) did not exit after `quit`"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = std::fs::remove_file(&paths.qmp_socket);
    let _ = std::fs::remove_file(&paths.query_socket);
    let _ = std::fs::remove_file(&paths.pid_file);
    Ok(())
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
