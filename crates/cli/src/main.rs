//! `vmsnap`: a thin command-line front end over `vmsnap-core` and `vmsnap-qcow2`.
//!
//! All logic a library caller could need lives in the library crates; this binary
//! only parses arguments, calls the library and renders tables, trees and JSON.
//!
//! Command groups are modules: `img` is a subcommand of its own, the domain
//! and snapshot commands are flattened to the top level as virsh has
//! them. Adding a group is a variant (`#[command(flatten)] X(x::XCommand)`)
//! and its dispatch arm.

mod check;
mod domain;
mod img;
mod snapshot;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Options every subcommand sees.
#[derive(Debug, Clone, clap::Args)]
pub struct Globals {
    /// State directory (default: /var/lib/vmsnap for root, $XDG_DATA_HOME/vmsnap otherwise).
    #[arg(long, global = true, env = "VMSNAP_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print data as JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Wait for a domain another vmsnap command is working on, instead of failing at once.
    #[arg(long, global = true)]
    pub wait: bool,
}

#[derive(Debug, Parser)]
#[command(name = "vmsnap", version, about = "VM snapshots for QEMU/KVM")]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work on disk images directly (flags as qemu-img has them).
    Img(img::ImgArgs),
    #[command(flatten)]
    Domain(domain::DomainCommand),
    #[command(flatten)]
    Snapshot(snapshot::SnapshotCommand),
    /// Check a domain's images, files and snapshot records; repair with -r leaks|all.
    Check(check::CheckArgs),
}

fn main() -> ExitCode {
    // Parsed in two steps (what `Cli::parse` does) so the snapshot commands
    // can see where each argument stood: virsh fills its positional options
    // in command-line order, around the ones given by name.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .unwrap_or_else(|err| err.format(&mut Cli::command()).exit());
    let result = match cli.command {
        Command::Img(args) => img::run(args, &cli.globals),
        Command::Domain(command) => domain::run(command, &cli.globals),
        Command::Snapshot(command) => snapshot::run(command, &matches, &cli.globals),
        Command::Check(args) => check::run(args, &cli.globals),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// Renders an error and its causes on one line, as every user-facing refusal must be.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    terminal_safe(&parts.join(": "))
}

/// Line breaks become spaces and other control characters visible escapes
/// (`\x1b`), so a hostile name quoted in an error can neither break the
/// one-line rule nor drive the user's terminal.
fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_on_one_terminal_safe_line() {
        let err = anyhow::anyhow!("bad name 'a\tb\u{1b}[31mc\u{7f}'\nsecond line");
        let err = err.context("snapshot-create-as failed");
        let line = one_line(&err);
        assert_eq!(
            line,
            "snapshot-create-as failed: bad name 'a\\x09b\\x1b[31mc\\x7f' second line"
        );
        assert!(!line.chars().any(char::is_control));
    }
}
