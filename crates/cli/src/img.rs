//! `vmsnap img …`: image commands with qemu-img's flags and output formats.
//!
//! Everything here is parsing and rendering; the work is done by `vmsnap-qcow2`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use vmsnap_qcow2::{
    self as qcow2, BackingFile, BackingPolicy, CheckReport, Compat, CreateOptions, ImageFormat,
    OpenOptions, Qcow2Image, RawImage, RepairMode, SnapshotInfo,
};

use crate::Globals;

/// Arguments of `vmsnap img`.
#[derive(Debug, Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    command: ImgCommand,
}

#[derive(Debug, Subcommand)]
enum ImgCommand {
    /// Create a raw or qcow2 image (optionally an overlay of a backing file).
    Create(CreateArgs),
    /// Show an image's format, sizes, backing file and snapshots.
    Info(InfoArgs),
    /// Check a qcow2 image's metadata and optionally repair it.
    Check(CheckArgs),
    /// Create, list, apply or delete internal snapshots.
    Snapshot(SnapshotArgs),
    /// Merge an overlay into its backing file and empty the overlay.
    Commit(CommitArgs),
    /// Change an overlay's backing file.
    Rebase(RebaseArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Image format (qemu-img's default is raw).
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    format: String,
    /// Backing file for a qcow2 overlay (needs -F).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (never probed).
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Options: cluster_size=N, compat=0.10|1.1, refcount_bits=N, backing_file=, backing_fmt=.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image to create.
    file: PathBuf,
    /// Virtual size, with an optional k, M, G, T, P or E suffix (powers of 1024).
    size: Option<String>,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Image format (detected from the file's magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Open without locks, even while another process (QEMU) writes the image.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image to describe.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Image format (detected from the file's magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Repair: "leaks" or "all".
    #[arg(short = 'r', value_name = "leaks|all")]
    repair: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image to check.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct SnapshotArgs {
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "NAME", group = "op")]
    create: Option<String>,
    /// List snapshots (the default).
    #[arg(short = 'l', group = "op")]
    list: bool,
    /// Delete a snapshot (by id or name).
    #[arg(short = 'd', value_name = "NAME", group = "op")]
    delete: Option<String>,
    /// Revert the image to a snapshot (by id or name).
    #[arg(short = 'a', value_name = "NAME", group = "op")]
    apply: Option<String>,
    /// Image format (detected from the file's magic when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format for -l.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// With -l: open without locks, even while another process (QEMU) writes the image.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct CommitArgs {
    /// Image format of the overlay (must be qcow2).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The overlay to commit.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct RebaseArgs {
    /// Unsafe: only rewrite the header, copy no data.
    #[arg(short = 'u')]
    unsafe_: bool,
    /// New backing file ("" for none).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
    /// Format of the new backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Image format of the overlay (must be qcow2).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The overlay.
    file: PathBuf,
}

/// Runs an image command.
pub fn run(args: ImgArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let json = |o: OutputFormat| globals.json || o == OutputFormat::Json;
    match args.command {
        ImgCommand::Create(a) => create(a),
        ImgCommand::Info(a) => {
            let j = json(a.output);
            info(a, j)
        }
        ImgCommand::Check(a) => {
            let j = json(a.output);
            check(a, j)
        }
        ImgCommand::Snapshot(a) => {
            let j = json(a.output);
            snapshot(a, j)
        }
        ImgCommand::Commit(a) => commit(a),
        ImgCommand::Rebase(a) => rebase(a),
    }
}

fn parse_format(s: &str) -> anyhow::Result<ImageFormat> {
    s.parse::<ImageFormat>().map_err(|e| anyhow!(e))
}

/// The format of an image a user named: `-f` if given, else the file's magic.
fn image_format(path: &Path, given: Option<&str>) -> anyhow::Result<ImageFormat> {
    match given {
        Some(f) => parse_format(f),
        None => Ok(qcow2::detect_format(path)?),
    }
}

fn require_qcow2(path: &Path, format: ImageFormat, what: &str) -> anyhow::Result<()> {
    if format != ImageFormat::Qcow2 {
        bail!(
            "{}: {what} needs a qcow2 image, but the image is {format}",
            path.display()
        );
    }
    Ok(())
}

/// Parses qemu-img sizes: a number with an optional k/M/G/T/P/E suffix (powers of 1024).
fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => bail!("invalid size '{text}': unknown suffix '{c}' (use k, M, G, T, P or E)"),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1u64),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid size '{text}': not a number"))?;
    if value.is_nan() || value < 0.0 || !value.is_finite() {
        bail!("invalid size '{text}'");
    }
    let bytes = value * mult as f64;
    if bytes > i64::MAX as f64 {
        bail!("invalid size '{text}': too large");
    }
    Ok(bytes as u64)
}

fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let format = parse_format(&a.format)?;
    let mut opts = CreateOptions::default();
    let mut backing = a.backing.clone();
    let mut backing_format = a.backing_format.clone();
    let mut explicit_cluster = false;
    let mut explicit_refcount = false;
    for group in &a.options {
        for item in group.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("invalid option '{item}': expected key=value"))?;
            match key {
                "cluster_size" => {
                    opts.cluster_size = u32::try_from(parse_size(value)?)
                        .map_err(|_| anyhow!("cluster_size {value} is too large"))?;
                    explicit_cluster = true;
                }
                "compat" => {
                    opts.compat = match value {
                        "0.10" | "v2" => Compat::V2,
                        "1.1" | "v3" => Compat::V3,
                        other => bail!("invalid compat level '{other}' (use 0.10 or 1.1)"),
                    }
                }
                "refcount_bits" => {
                    opts.refcount_bits = value
                        .parse()
                        .map_err(|_| anyhow!("invalid refcount_bits '{value}'"))?;
                    explicit_refcount = true;
                }
                "backing_file" => backing = Some(value.to_string()),
                "backing_fmt" => backing_format = Some(value.to_string()),
                "size" => opts.size = parse_size(value)?,
                other => bail!("invalid option '{other}' for image creation"),
            }
        }
    }
    if format == ImageFormat::Raw && (explicit_cluster || explicit_refcount) {
        bail!("raw images take no cluster_size or refcount_bits options");
    }
    if let Some(size) = &a.size {
        opts.size = parse_size(size)?;
    }
    match (backing, backing_format) {
        (Some(b), Some(f)) => {
            opts.backing = Some(BackingFile {
                path: b,
                format: parse_format(&f)?,
            })
        }
        (Some(b), None) => bail!(
            "{}: backing file '{b}' given without its format; add -F raw or -F qcow2 (formats are never probed)",
            a.file.display()
        ),
        (None, Some(_)) => bail!("-F needs a backing file (-b)"),
        (None, None) => {
            if a.size.is_none() && opts.size == 0 {
                bail!(
                    "{}: image size must be given (or a backing file to take it from)",
                    a.file.display()
                );
            }
        }
    }
    qcow2::create(&a.file, format, &opts)?;
    if !a.quiet {
        let size = match format {
            ImageFormat::Raw => opts.size,
            ImageFormat::Qcow2 => Qcow2Image::open(
                &a.file,
                OpenOptions {
                    writable: false,
                    backing: BackingPolicy::Ignore,
                },
            )?
            .size(),
        };
        let mut line = format!("Formatting '{}', fmt={format}", a.file.display());
        if format == ImageFormat::Qcow2 {
            line.push_str(&format!(
                " cluster_size={} extended_l2=off compression_type=zlib",
                opts.cluster_size
            ));
        }
        line.push_str(&format!(" size={size}"));
        if let Some(b) = &opts.backing {
            line.push_str(&format!(
                " backing_file={} backing_fmt={}",
                b.path, b.format
            ));
        }
        if format == ImageFormat::Qcow2 {
            line.push_str(&format!(
                " lazy_refcounts=off refcount_bits={}",
                opts.refcount_bits
            ));
            if opts.compat == Compat::V2 {
                line.push_str(" compat=0.10");
            }
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// qemu's size_to_str: three significant digits and a binary unit.
fn size_to_str(value: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0;
    // Same thresholds as qemu: the next unit once the value reaches 1000 of the smaller one.
    while i < UNITS.len() - 1 && value as f64 * 1.024 >= (1u64 << ((i + 1) * 10)) as f64 {
        i += 1;
    }
    let scaled = value as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(scaled), UNITS[i])
}

/// printf's "%0.3g" for the values size_to_str produces.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let digits = x.abs().log10().floor() as i32 + 1;
    let decimals = (3 - digits).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn local_time(secs: u32) -> String {
    format_utc_time(i64::from(secs))
}

/// Formats seconds since the epoch as "%Y-%m-%d %H:%M:%S" in UTC.
///
/// qemu-img prints local time; the two agree on hosts running in UTC (as these
/// machines and CI do). The binary has no time-zone database dependency.
fn format_utc_time(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem / 60) % 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
}

fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    ));
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{:<9} {:<17}{:>8}{:>20}{:>13}{:>11}\n",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_time(s.date_sec),
            clock,
            icount
        ));
    }
    out
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct SnapshotJson {
    id: String,
    name: String,
    vm_state_size: u64,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_sec: u64,
    vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
}

impl From<&SnapshotInfo> for SnapshotJson {
    fn from(s: &SnapshotInfo) -> Self {
        SnapshotJson {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FormatSpecificData {
    compat: &'static str,
    compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

#[derive(Serialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: FormatSpecificData,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct InfoJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<Vec<SnapshotJson>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    virtual_size: u64,
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: String,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
    dirty_flag: bool,
}

fn to_json<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser)?;
    Ok(String::from_utf8(out)?)
}

fn info(a: InfoArgs, json: bool) -> anyhow::Result<ExitCode> {
    let format = image_format(&a.file, a.format.as_deref())?;
    let filename = a.file.display().to_string();
    let result = match format {
        ImageFormat::Raw => {
            let virtual_size = if a.force_share {
                std::fs::metadata(&a.file)
                    .with_context(|| format!("{}: cannot stat the image", a.file.display()))?
                    .len()
            } else {
                qcow2::Disk::size(&RawImage::open(&a.file, false)?)
            };
            let actual = std::fs::metadata(&a.file)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            InfoJson {
                snapshots: None,
                backing_filename_format: None,
                virtual_size,
                filename,
                cluster_size: None,
                format: "raw".into(),
                actual_size: actual,
                full_backing_filename: None,
                backing_filename: None,
                format_specific: None,
                dirty_flag: false,
            }
        }
        ImageFormat::Qcow2 => {
            let img = if a.force_share {
                Qcow2Image::open_force_share(&a.file)?
            } else {
                Qcow2Image::open(
                    &a.file,
                    OpenOptions {
                        writable: false,
                        backing: BackingPolicy::Ignore,
                    },
                )?
            };
            let i = img.info();
            let v3 = i.compat == Compat::V3;
            InfoJson {
                snapshots: (!i.snapshots.is_empty())
                    .then(|| i.snapshots.iter().map(SnapshotJson::from).collect()),
                backing_filename_format: i.backing_format.clone(),
                virtual_size: i.virtual_size,
                filename,
                cluster_size: Some(i.cluster_size),
                format: "qcow2".into(),
                actual_size: i.actual_size,
                full_backing_filename: i.backing_filename.as_ref().map(|b| {
                    qcow2::resolve_backing_path(&a.file, b)
                        .display()
                        .to_string()
                }),
                backing_filename: i.backing_filename.clone(),
                format_specific: Some(FormatSpecific {
                    kind: "qcow2",
                    data: FormatSpecificData {
                        compat: i.compat.as_str(),
                        compression_type: i.compression_type,
                        lazy_refcounts: v3.then_some(i.lazy_refcounts),
                        refcount_bits: i.refcount_bits,
                        corrupt: v3.then_some(i.corrupt),
                        extended_l2: v3.then_some(false),
                    },
                }),
                dirty_flag: i.dirty,
            }
        }
    };
    if json {
        println!("{}", to_json(&result)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    out.push_str(&format!("image: {}\n", result.filename));
    out.push_str(&format!("file format: {}\n", result.format));
    out.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(result.virtual_size),
        result.virtual_size
    ));
    out.push_str(&format!("disk size: {}\n", size_to_str(result.actual_size)));
    if let Some(cs) = result.cluster_size {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if result.dirty_flag {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &result.backing_filename {
        out.push_str(&format!("backing file: {b}"));
        if let Some(full) = &result.full_backing_filename {
            if full != b {
                out.push_str(&format!(" (actual path: {full})"));
            }
        }
        out.push('\n');
    }
    if let Some(f) = &result.backing_filename_format {
        out.push_str(&format!("backing file format: {f}\n"));
    }
    if let Some(snaps) = &result.snapshots {
        let infos: Vec<SnapshotInfo> = snaps
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_sec * 1_000_000_000 + s.vm_clock_nsec,
                icount: s.icount,
                disk_size: 0,
            })
            .collect();
        out.push_str(&snapshot_table(&infos));
    }
    if let Some(fs) = &result.format_specific {
        let d = &fs.data;
        out.push_str("Format specific information:\n");
        out.push_str(&format!("    compat: {}\n", d.compat));
        out.push_str(&format!("    compression type: {}\n", d.compression_type));
        if let Some(l) = d.lazy_refcounts {
            out.push_str(&format!("    lazy refcounts: {l}\n"));
        }
        out.push_str(&format!("    refcount bits: {}\n", d.refcount_bits));
        if let Some(c) = d.corrupt {
            out.push_str(&format!("    corrupt: {c}\n"));
        }
        if let Some(e) = d.extended_l2 {
            out.push_str(&format!("    extended l2: {e}\n"));
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckJson {
    #[serde(skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    total_clusters: u64,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    filename: String,
    format: &'static str,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn check(a: CheckArgs, json: bool) -> anyhow::Result<ExitCode> {
    let repair = match a.repair.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(other) => bail!("invalid repair mode '{other}' (use leaks or all)"),
    };
    let format = image_format(&a.file, a.format.as_deref())?;
    if format != ImageFormat::Qcow2 {
        bail!(
            "{}: this image format ({format}) does not support checks",
            a.file.display()
        );
    }
    let mut img = Qcow2Image::open_for_check(&a.file, repair.is_some())?;
    let report: CheckReport = img
        .check(repair)
        .with_context(|| format!("{}: check failed", a.file.display()))?;
    drop(img);
    for m in &report.messages {
        eprintln!("{m}");
    }
    if json {
        let j = CheckJson {
            image_end_offset: report.image_end_offset,
            total_clusters: report.total_clusters,
            check_errors: report.check_errors,
            leaks: report.leaks,
            corruptions: report.corruptions,
            leaks_fixed: report.leaks_fixed,
            corruptions_fixed: report.corruptions_fixed,
            allocated_clusters: report.allocated_clusters,
            fragmented_clusters: report.fragmented_clusters,
            compressed_clusters: report.compressed_clusters,
            filename: a.file.display().to_string(),
            format: "qcow2",
        };
        println!("{}", to_json(&j)?);
    } else if !a.quiet || report.exit_code() != 0 {
        print!("{}", render_check(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// qemu-img check's human-readable summary.
fn render_check(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.leaks_fixed + r.corruptions_fixed > 0 {
        out.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

fn snapshot(a: SnapshotArgs, json: bool) -> anyhow::Result<ExitCode> {
    let format = image_format(&a.file, a.format.as_deref())?;
    require_qcow2(&a.file, format, "internal snapshots")?;
    let writable = a.create.is_some() || a.delete.is_some() || a.apply.is_some();
    if writable && a.force_share {
        bail!("-U (force share) is only allowed with -l");
    }
    let mut img = if a.force_share {
        Qcow2Image::open_force_share(&a.file)?
    } else {
        Qcow2Image::open(
            &a.file,
            OpenOptions {
                writable,
                backing: BackingPolicy::Ignore,
            },
        )?
    };
    if let Some(name) = &a.create {
        img.create_snapshot(name)?;
    } else if let Some(name) = &a.delete {
        img.delete_snapshot(name)?;
    } else if let Some(name) = &a.apply {
        img.apply_snapshot(name)?;
    } else {
        let snaps = img.snapshots();
        if json {
            let list: Vec<SnapshotJson> = snaps.iter().map(SnapshotJson::from).collect();
            println!("{}", to_json(&list)?);
        } else if !snaps.is_empty() {
            print!("{}", snapshot_table(&snaps));
        }
        return Ok(ExitCode::SUCCESS);
    }
    img.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn commit(a: CommitArgs) -> anyhow::Result<ExitCode> {
    let format = image_format(&a.file, a.format.as_deref())?;
    require_qcow2(&a.file, format, "commit")?;
    qcow2::commit(&a.file)?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(ExitCode::SUCCESS)
}

fn rebase(a: RebaseArgs) -> anyhow::Result<ExitCode> {
    let format = image_format(&a.file, a.format.as_deref())?;
    require_qcow2(&a.file, format, "rebase")?;
    let backing = if a.backing.is_empty() {
        None
    } else {
        let f = a.backing_format.as_deref().ok_or_else(|| {
            anyhow!(
                "{}: new backing file '{}' given without its format; add -F raw or -F qcow2",
                a.file.display(),
                a.backing
            )
        })?;
        Some(BackingFile {
            path: a.backing.clone(),
            format: parse_format(f)?,
        })
    };
    qcow2::rebase(&a.file, backing, a.unsafe_)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn sizes_print_like_qemu_img() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(67108864), "64 MiB");
        assert_eq!(size_to_str(1077248), "1.03 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(196624), "192 KiB");
    }

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(format_utc_time(1795310324), "2026-11-22 01:18:44");
        assert_eq!(format_utc_time(0), "1970-01-01 00:00:00");
    }
}
