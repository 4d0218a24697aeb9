//! Domain commands (`define`, `start`, `list`, `dominfo`, ...): argument
//! parsing and virsh-style rendering over `vmsnap_core::Host`.
//!
//! Output follows virsh: the same messages, tables and field layouts, and the
//! blank line virsh prints after each command's output, so scripts written
//! for virsh keep working. `--json` gives data commands a JSON rendering.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use vmsnap_core::snapshot::orchestrate::Orchestrator;
use vmsnap_core::{
    DiskStats, Domain, DomainLock, DomainState, Host, LaunchOptions, LockWait, QemuProcess,
};

use crate::Globals;

/// The domain lifecycle and monitoring commands (top-level, as in virsh).
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// Define a domain from a TOML config file.
    Define {
        /// The domain config (TOML).
        file: PathBuf,
    },
    /// Forget a domain (its disk images are kept).
    Undefine {
        /// Domain name.
        domain: String,
        /// Also drop the domain's snapshot metadata (snapshot files are kept).
        #[arg(long)]
        snapshots_metadata: bool,
    },
    /// Start a defined domain.
    Start {
        /// Domain name.
        domain: String,
        /// Leave the vCPUs paused (resume with `vmsnap resume`).
        #[arg(long)]
        paused: bool,
    },
    /// Ask the guest to power off (ACPI power button).
    Shutdown {
        /// Domain name.
        domain: String,
    },
    /// Stop a domain's QEMU at once.
    Destroy {
        /// Domain name.
        domain: String,
    },
    /// Pause a running domain.
    Suspend {
        /// Domain name.
        domain: String,
    },
    /// Resume a paused domain.
    Resume {
        /// Domain name.
        domain: String,
    },
    /// List domains (running ones unless --all or --inactive).
    List {
        /// Include inactive domains.
        #[arg(long)]
        all: bool,
        /// Only inactive domains.
        #[arg(long)]
        inactive: bool,
    },
    /// Show a domain's basic information.
    Dominfo {
        /// Domain name.
        domain: String,
    },
    /// List a domain's disks and their current images.
    Domblklist {
        /// Domain name.
        domain: String,
    },
    /// Show block I/O statistics of one disk, or summed over all disks.
    Domblkstat {
        /// Domain name.
        domain: String,
        /// Disk target (vda, ...); all disks summed when omitted.
        disk: Option<String>,
    },
    /// Run a QMP command on a running domain and print its return value.
    Qmp {
        /// Domain name.
        domain: String,
        /// QMP command name (e.g. query-status).
        command: String,
        /// Arguments as a JSON object.
        args: Option<String>,
    },
}

impl DomainCommand {
    /// The domain a command changes (not `define`, nor the read-only ones).
    fn acted_on(&self) -> Option<&str> {
        match self {
            DomainCommand::Undefine { domain, .. }
            | DomainCommand::Start { domain, .. }
            | DomainCommand::Shutdown { domain }
            | DomainCommand::Destroy { domain }
            | DomainCommand::Suspend { domain }
            | DomainCommand::Resume { domain }
            | DomainCommand::Qmp { domain, .. } => Some(domain),
            DomainCommand::Define { .. }
            | DomainCommand::List { .. }
            | DomainCommand::Dominfo { .. }
            | DomainCommand::Domblklist { .. }
            | DomainCommand::Domblkstat { .. } => None,
        }
    }
}

/// Runs one domain command.
pub fn run(command: DomainCommand, globals: &Globals) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let host = Host::open(globals.state_dir.as_deref())?;
    let wait = if globals.wait {
        LockWait::Wait
    } else {
        LockWait::Fail
    };
    let output = runtime.block_on(execute(command, &host, wait, globals.json))?;
    print!("{output}");
    Ok(ExitCode::SUCCESS)
}

async fn execute(
    command: DomainCommand,
    host: &Host,
    wait: LockWait,
    json: bool,
) -> Result<String> {
    let store = host.store();
    if let Some(domain) = command.acted_on() {
        // A killed vmsnap may have left a snapshot operation half done:
        // finish or roll it back before acting on the domain.
        let notes = Orchestrator::new(host)?
            .wait_for_lock(wait == LockWait::Wait)
            .recover_if_interrupted(domain)
            .await?;
        notes.iter().for_each(|note| eprintln!("note: {note}"));
    }
    match command {
        DomainCommand::Define { file } => {
            let domain = host.define(&file, wait)?;
            Ok(message(&format!(
                "Domain '{}' defined from {}",
                domain.name(),
                file.display()
            )))
        }
        DomainCommand::Undefine {
            domain,
            snapshots_metadata,
        } => {
            host.undefine(&domain, wait, snapshots_metadata)?;
            Ok(message(&format!("Domain '{domain}' has been undefined")))
        }
        DomainCommand::Start { domain, paused } => {
            let (lock, dom) = host.lock(&domain, wait)?;
            let options = LaunchOptions {
                paused,
                incoming_defer: false,
            };
            dom.start(store, &lock, options).await?;
            Ok(message(&format!("Domain '{domain}' started")))
        }
        DomainCommand::Shutdown { domain } => {
            let (lock, dom) = host.lock(&domain, wait)?;
            reconciled(host, &lock, &dom)?;
            dom.shutdown(&lock).await?;
            Ok(message(&format!("Domain '{domain}' is being shutdown")))
        }
        DomainCommand::Destroy { domain } => {
            let (lock, dom) = host.lock(&domain, wait)?;
            dom.destroy(store, &lock).await?;
            Ok(message(&format!("Domain '{domain}' destroyed")))
        }
        DomainCommand::Suspend { domain } => {
            let (lock, dom) = host.lock(&domain, wait)?;
            reconciled(host, &lock, &dom)?;
            dom.suspend(&lock).await?;
            Ok(message(&format!("Domain '{domain}' suspended")))
        }
        DomainCommand::Resume { domain } => {
            let (lock, dom) = host.lock(&domain, wait)?;
            reconciled(host, &lock, &dom)?;
            dom.resume(&lock).await?;
            Ok(message(&format!("Domain '{domain}' resumed")))
        }
        DomainCommand::List { all, inactive } => list(host, all, inactive, json).await,
        DomainCommand::Dominfo { domain } => dominfo(&host.domain(&domain)?, json).await,
        DomainCommand::Domblklist { domain } => Ok(domblklist(&host.domain(&domain)?, json)),
        DomainCommand::Domblkstat { domain, disk } => {
            domblkstat(&host.domain(&domain)?, disk.as_deref(), json).await
        }
        DomainCommand::Qmp {
            domain,
            command,
            args,
        } => {
            let arguments = match args {
                Some(text) => {
                    let value: Value = serde_json::from_str(&text)
                        .with_context(|| format!("QMP arguments are not valid JSON: {text}"))?;
                    if !value.is_object() {
                        anyhow::bail!("QMP arguments must be a JSON object, got: {text}");
                    }
                    Some(value)
                }
                None => None,
            };
            let (lock, dom) = host.lock(&domain, wait)?;
            reconciled(host, &lock, &dom)?;
            let reply = dom.qmp_command(&lock, &command, arguments).await?;
            Ok(format!("{}\n", serde_json::to_string_pretty(&reply)?))
        }
    }
}

/// Tidies up after a QEMU that died before a command acts on the domain.
fn reconciled(host: &Host, lock: &DomainLock, domain: &Domain) -> Result<()> {
    domain.reconcile(host.store(), lock)?;
    Ok(())
}

/// A virsh action message: the text, then the blank line virsh ends every command with.
fn message(text: &str) -> String {
    format!("{text}\n\n")
}

/// One row of `list`.
struct ListRow {
    id: Option<i64>,
    name: String,
    state: DomainState,
}

async fn list(host: &Host, all: bool, inactive_only: bool, json: bool) -> Result<String> {
    let mut rows = Vec::new();
    for domain in host.domains()? {
        let domain = tidy_if_crashed(host, domain)?;
        let state = domain.state().await?;
        let active = state.is_active();
        let wanted = if inactive_only {
            !active
        } else {
            all || active
        };
        if wanted {
            rows.push(ListRow {
                id: if active { domain.run_id() } else { None },
                name: domain.name().to_string(),
                state,
            });
        }
    }
    // virsh lists running domains by Id first, then inactive ones by name.
    rows.sort_by(|a, b| match (a.id, b.id) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.name.cmp(&b.name),
    });
    if json {
        let value: Vec<Value> = rows
            .iter()
            .map(|r| json!({"id": r.id, "name": r.name, "state": r.state.as_str()}))
            .collect();
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.map_or("-".to_string(), |id| id.to_string()),
                r.name.clone(),
                r.state.to_string(),
            ]
        })
        .collect();
    Ok(format!("{}\n", table(&["Id", "Name", "State"], &cells)))
}

/// If the domain's QEMU died uncleanly and nobody holds the lock, records
/// the crash and removes the stale pid file and sockets (never waits).
fn tidy_if_crashed(host: &Host, domain: Domain) -> Result<Domain> {
    if !matches!(domain.process()?, QemuProcess::Gone(_)) {
        return Ok(domain);
    }
    let Some(lock) = DomainLock::try_acquire(domain.name(), domain.paths())? else {
        return Ok(domain);
    };
    domain.reconcile(host.store(), &lock)?;
    Ok(host.domain(domain.name())?)
}

async fn dominfo(domain: &Domain, json: bool) -> Result<String> {
    let state = domain.state().await?;
    let config = domain.config();
    let id = if state.is_active() {
        domain.run_id()
    } else {
        None
    };
    let cpu_time = domain.cpu_time();
    let memory_kib = config.memory_mib * 1024;
    if json {
        let value = json!({
            "id": id,
            "name": domain.name(),
            "uuid": domain.uuid(),
            "os_type": "hvm",
            "state": state.as_str(),
            "cpus": config.vcpus,
            "cpu_time_seconds": cpu_time.map(|t| t.as_secs_f64()),
            "max_memory_kib": memory_kib,
            "used_memory_kib": memory_kib,
            "persistent": true,
            "autostart": false,
            "managed_save": false,
        });
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "{:<15} {}", format!("{label}:"), value);
    };
    field("Id", id.map_or("-".to_string(), |i| i.to_string()));
    field("Name", domain.name().to_string());
    field("UUID", domain.uuid().to_string());
    field("OS Type", "hvm".into());
    field("State", state.to_string());
    field("CPU(s)", config.vcpus.to_string());
    if let Some(time) = cpu_time {
        field("CPU time", format!("{:.1}s", time.as_secs_f64()));
    }
    field("Max memory", format!("{memory_kib} KiB"));
    field("Used memory", format!("{memory_kib} KiB"));
    field("Persistent", "yes".into());
    field("Autostart", "disable".into());
    field("Managed save", "no".into());
    field("Security model", "none".into());
    field("Security DOI", "0".into());
    out.push('\n');
    Ok(out)
}

fn domblklist(domain: &Domain, json: bool) -> String {
    if json {
        let value: Vec<Value> = domain
            .disks()
            .iter()
            .map(|chain| {
                let active = chain.active();
                json!({
                    "target": chain.target,
                    "source": active.map(|l| l.path.display().to_string()),
                    "format": active.map(|l| l.format.as_str()),
                    "node_name": active.map(|l| l.node_name.clone()),
                    "backing": chain.layers.iter().skip(1).map(|l| json!({
                        "source": l.path.display().to_string(),
                        "format": l.format.as_str(),
                        "node_name": l.node_name,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    let cells: Vec<Vec<String>> = domain
        .disks()
        .iter()
        .map(|chain| {
            let source = chain
                .active()
                .map_or("-".to_string(), |l| l.path.display().to_string());
            vec![chain.target.clone(), source]
        })
        .collect();
    format!("{}\n", table(&["Target", "Source"], &cells))
}

async fn domblkstat(domain: &Domain, disk: Option<&str>, json: bool) -> Result<String> {
    // As in virsh, a disk is named by its target or by its image's path.
    let disk = disk.map(|name| {
        domain
            .disks()
            .iter()
            .find(|c| c.active().is_some_and(|l| l.path.as_os_str() == name))
            .map_or(name, |c| c.target.as_str())
    });
    if let Some(target) = disk {
        if !domain.disks().iter().any(|c| c.target == target) {
            let known: Vec<&str> = domain.disks().iter().map(|c| c.target.as_str()).collect();
            anyhow::bail!(
                "domain '{}' has no disk '{target}' (its disks: {})",
                domain.name(),
                known.join(", ")
            );
        }
    }
    let all = domain.block_stats().await?;
    let stats = match disk {
        Some(target) => all
            .into_iter()
            .find(|s| s.target == target)
            .unwrap_or_default(),
        None => DiskStats::sum(&all),
    };
    if json {
        let mut value = serde_json::to_value(&stats)?;
        if disk.is_none() {
            if let Some(map) = value.as_object_mut() {
                map.remove("target");
            }
        }
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let mut out = String::new();
    for (name, value) in stats.fields() {
        let _ = writeln!(out, "{} {name} {value}", stats.target);
    }
    out.push('\n');
    Ok(out)
}

/// Renders a table as virsh's vshTable does: a leading space per cell,
/// columns padded to their widest cell plus two spaces, and a dashed rule of
/// each column's width plus three.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let render_row = |cells: &[String]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            line.push(' ');
            line.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        line.push('\n');
        line
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = render_row(&header);
    out.push_str(&"-".repeat(widths.iter().map(|w| w + 3).sum()));
    out.push('\n');
    for row in rows {
        out.push_str(&render_row(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_table_matches_virsh() {
        let rows = vec![
            vec!["1".to_string(), "demo".to_string(), "running".to_string()],
            vec![
                "-".to_string(),
                "longer-name".to_string(),
                "shut off".to_string(),
            ],
        ];
        assert_eq!(
            table(&["Id", "Name", "State"], &rows),
            " Id   Name          State\n\
             ------------------------------\n \
             1    demo          running\n \
             -    longer-name   shut off\n"
        );
        assert_eq!(
            table(&["Id", "Name", "State"], &[]),
            " Id   Name   State\n--------------------\n"
        );
    }

    #[test]
    fn blklist_table_matches_virsh() {
        let rows = vec![vec!["vda".to_string(), "/var/lib/a.qcow2".to_string()]];
        assert_eq!(
            table(&["Target", "Source"], &rows),
            " Target   Source\n----------------------------\n vda      /var/lib/a.qcow2\n"
        );
    }
}
