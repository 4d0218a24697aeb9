//! `vmsnap check DOM [-r leaks|all]`: `qemu-img check` for a whole domain,
//! over `Orchestrator::check`. Rendering and the exit status only.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use vmsnap_core::snapshot::orchestrate::{
    CheckRepair, CheckReport, FindingKind, Orchestrator, Severity,
};
use vmsnap_core::Host;

use crate::Globals;

const EXIT_CODES: &str = "\
Finishes or rolls back an interrupted snapshot operation first, then checks every
image of the domain's disks and snapshots (qcow2 through vmsnap's engine, raw for
existence), files vmsnap made that nothing uses any more, snapshots whose images,
memory images or internal snapshots are missing, and internal snapshots no record
knows. Images a running QEMU has open are checked read-only (like qemu-img -U) and
only repaired once the domain is stopped. Metadata, internal snapshots and files
vmsnap did not make are never deleted: the report names the command that does it.

Exit status (as qemu-img check):
  0  no problems left (notices may be shown)
  1  the check could not look at everything (an image could not be read) or failed
  2  corruption or missing data: an image is corrupt, or the domain or a snapshot
     needs a file or internal snapshot that is gone
  3  only leaked clusters or orphaned files are left: `-r leaks` repairs them
     (`-r all` for files vmsnap no longer records as its own)";

/// Arguments of `vmsnap check`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct CheckArgs {
    /// Domain name.
    pub domain: String,
    /// Repair: `leaks` frees leaked clusters of images no QEMU has open and
    /// removes orphaned files vmsnap records as its own; `all` also fixes
    /// refcount errors (as qemu-img check -r all: back images up first) and
    /// removes unneeded files in the domain's snapshot area that vmsnap no
    /// longer records (e.g. left by snapshot-delete --metadata).
    #[arg(short = 'r', long, value_name = "leaks|all", value_parser = parse_repair)]
    pub repair: Option<CheckRepair>,
}

fn parse_repair(value: &str) -> Result<CheckRepair, String> {
    match value {
        "leaks" => Ok(CheckRepair::Leaks),
        "all" => Ok(CheckRepair::All),
        other => Err(format!("'{other}' is not a repair mode: use leaks or all")),
    }
}

/// The JSON document: the report and the exit status it leads to.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a CheckReport,
    exit_code: u8,
}

/// Runs `vmsnap check`.
pub fn run(args: CheckArgs, globals: &Globals) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let host = Host::open(globals.state_dir.as_deref())?;
    let orchestrator = Orchestrator::new(&host)?.wait_for_lock(globals.wait);
    let report = runtime.block_on(orchestrator.check(&args.domain, args.repair))?;
    let code = report.exit_code();
    if globals.json {
        let doc = JsonReport {
            report: &report,
            exit_code: code,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::from(code))
}

fn label(severity: Severity) -> &'static str {
    match severity {
        Severity::Corruption => "corruption",
        Severity::Error => "error",
        Severity::Leak => "leak",
        Severity::Notice => "notice",
    }
}

/// The text report: what recovery did, one line per finding, a summary.
fn render(report: &CheckReport) -> String {
    let mut out = String::new();
    for note in &report.recovery {
        out.push_str(&format!("recovery: {note}\n"));
    }
    for finding in report.findings.iter().filter(|f| f.repaired) {
        out.push_str(&format!("repaired: {}\n", finding.message));
    }
    for finding in report.findings.iter().filter(|f| !f.repaired) {
        out.push_str(&format!(
            "{}: {}\n",
            label(finding.severity),
            finding.message
        ));
    }
    let images = report.images.len();
    let state = if report.running {
        "running"
    } else {
        "not running"
    };
    let repaired = report.findings.iter().filter(|f| f.repaired).count();
    let count = |severity: Severity| {
        report
            .findings
            .iter()
            .filter(|f| !f.repaired && f.severity == severity)
            .count()
    };
    let (corruptions, errors, leaks) = (
        count(Severity::Corruption),
        count(Severity::Error),
        count(Severity::Leak),
    );
    if corruptions + errors + leaks == 0 {
        if repaired == 0 {
            out.push_str(&format!(
                "No problems found: {images} image(s) of domain {} ({state}) checked.\n",
                report.domain
            ));
        } else {
            out.push_str(&format!(
                "Repaired {repaired} problem(s); no problems left: {images} image(s) of domain {} ({state}) checked.\n",
                report.domain
            ));
        }
        return out;
    }
    let mut parts = Vec::new();
    if corruptions > 0 {
        parts.push(format!("{corruptions} with corruption or missing data"));
    }
    if errors > 0 {
        parts.push(format!("{errors} that could not be checked"));
    }
    if leaks > 0 {
        parts.push(format!("{leaks} wasting space"));
    }
    out.push_str(&format!(
        "Domain {} ({state}): {} problem(s) left: {}; {images} image(s) checked.\n",
        report.domain,
        corruptions + errors + leaks,
        parts.join(", ")
    ));
    let left = |unrecorded: bool| {
        report.findings.iter().any(|f| {
            !f.repaired
                && f.severity == Severity::Leak
                && (f.kind == FindingKind::UnrecordedFile) == unrecorded
        })
    };
    if left(false) && report.repair.is_none() {
        out.push_str(&format!(
            "Run `vmsnap check {} -r leaks` to repair the leaks and orphaned files.\n",
            report.domain
        ));
    }
    if left(true) && report.repair != Some(CheckRepair::All) {
        out.push_str(&format!(
            "Run `vmsnap check {} -r all` to remove the files vmsnap no longer records as its own.\n",
            report.domain
        ));
    }
    out
}
