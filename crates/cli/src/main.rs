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
    let matches = match Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(err) => {
            if let Some(data) = unexpected_data(&err) {
                eprintln!("error: unexpected data '{}'", terminal_safe(&data));
                return ExitCode::FAILURE;
            }
            err.exit()
        }
    };
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

/// A value with no positional argument left for it (`snapshot-info a b c`)
/// on a virsh-style command: virsh refuses it on one line, `unexpected data
/// 'c'`, where clap would print its usage. Options clap does not know and
/// the `img` and `check` commands keep clap's message.
fn unexpected_data(err: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(data)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    if data.starts_with('-') || !virsh_style_command(std::env::args_os().skip(1)) {
        return None;
    }
    Some(data.clone())
}

/// Whether the command on the command line `args` (without the program)
/// is one of virsh's, found past the global options that may precede it.
fn virsh_style_command(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--state-dir") => {
                args.next();
            }
            Some("--json" | "--wait") => {}
            Some(a) if a.starts_with("--state-dir=") => {}
            Some(command) => return !matches!(command, "img" | "check" | "help"),
            None => return false,
        }
    }
    false
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
    fn extra_values_on_virsh_commands_are_unexpected_data() {
        let parse = |args: &[&str]| {
            Cli::command()
                .try_get_matches_from(std::iter::once("vmsnap").chain(args.iter().copied()))
                .unwrap_err()
        };
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let err = parse(&["snapshot-info", "a", "b", "c"]);
        assert_eq!(
            err.get(clap::error::ContextKind::InvalidArg),
            Some(&clap::error::ContextValue::String("c".into()))
        );
        assert!(virsh_style_command(args(&[
            "--state-dir",
            "img",
            "snapshot-info",
            "a"
        ])));
        assert!(virsh_style_command(args(&["--json", "dominfo"])));
        assert!(!virsh_style_command(args(&[
            "--state-dir=/s",
            "img",
            "info",
            "a",
            "b"
        ])));
        assert!(!virsh_style_command(args(&["check", "a", "b"])));
    }

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
