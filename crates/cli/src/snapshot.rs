//! Snapshot commands with virsh's names, flags, messages and output formats
//! (`snapshot-create-as`, `snapshot-list`, `snapshot-revert`, ...), over
//! `vmsnap_core::snapshot`. Rendering only: every decision is the core's.
//!
//! Every option virsh lets a script give by position (`DOMAIN`, the
//! snapshot name, `snapshot-create`'s file...) is both a positional
//! argument and a named one (`--domain`, `--snapshotname`, `--xmlfile`...),
//! as in virsh. clap only records what it saw where; [`place`] then gives
//! each positional value to the first option not given yet, in command-line
//! order, which is virsh's rule (`virsh snapshot-info --domain d s1` names
//! snapshot `s1`), and refuses an option given twice with virsh's words.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use vmsnap_core::snapshot::orchestrate::store::is_store_full;
use vmsnap_core::snapshot::orchestrate::{
    CreateRequest, DiskSpec, ErrorKind, MemSpec, Orchestrator, Progress, RevertMode,
};
use vmsnap_core::snapshot::render::{self, TimeZone};
use vmsnap_core::snapshot::tree::{DeleteScope, ListOutputOptions, ListQuery, SnapshotTree};
use vmsnap_core::snapshot::xml::{create_as_request_xml, snapshot_to_xml, DomainDiskSource};
use vmsnap_core::snapshot::{
    parse_snapshot_document, DiskSnapshotMode, SnapshotMeta, SnapshotMetaError,
};
use vmsnap_core::Host;

use crate::Globals;

// No doc comment here: clap would make it the help text of `vmsnap` itself,
// since this enum is flattened into the top-level command (see the module
// docs for how positional and named options pair up).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Create a snapshot from arguments.
    #[command(name = "snapshot-create-as")]
    CreateAs {
        #[command(flatten)]
        domain: DomainArg,
        /// Snapshot name (default: the current time in seconds).
        name: Option<String>,
        /// Description.
        description: Option<String>,
        /// Disk specs after the description, as virsh takes them (see --diskspec).
        #[arg(value_name = "DISKSPEC")]
        diskspec_args: Vec<String>,
        /// Snapshot name (alternative to the positional argument).
        #[arg(long = "name", value_name = "NAME")]
        name_flag: Option<String>,
        /// Description (alternative to the positional argument).
        #[arg(long = "description", value_name = "TEXT")]
        description_flag: Option<String>,
        /// Disks only, no memory.
        #[arg(long)]
        disk_only: bool,
        /// Memory: `[file=]PATH[,snapshot=external|internal|no]`.
        #[arg(long, value_name = "SPEC")]
        memspec: Option<String>,
        /// Disk: `DISK[,snapshot=internal|external|no][,driver=qcow2][,file=PATH]` (repeatable).
        #[arg(long, value_name = "SPEC")]
        diskspec: Vec<String>,
        /// External snapshot with files named by vmsnap in the state directory.
        #[arg(long)]
        external: bool,
        /// Print the domainsnapshot XML virsh would pass, and create nothing.
        #[arg(long)]
        print_xml: bool,
        #[command(flatten)]
        flags: CreateFlags,
    },
    /// Create a snapshot from libvirt domainsnapshot XML or an xl snapshot
    /// config; without a file, like snapshot-create-as DOM.
    #[command(name = "snapshot-create")]
    Create {
        #[command(flatten)]
        domain: DomainArg,
        /// The document (XML or xl config, told apart by content).
        #[arg(value_name = "XMLFILE")]
        file: Option<String>,
        /// The document (alternative to the positional argument).
        #[arg(long = "xmlfile", value_name = "FILE")]
        xmlfile: Option<String>,
        /// Record metadata for a snapshot whose data exists already.
        #[arg(long)]
        redefine: bool,
        /// With --redefine: make it the current snapshot.
        #[arg(long)]
        current: bool,
        /// Disks only, no memory.
        #[arg(long)]
        disk_only: bool,
        #[command(flatten)]
        flags: CreateFlags,
    },
    /// List snapshots.
    #[command(name = "snapshot-list")]
    List {
        #[command(flatten)]
        domain: DomainArg,
        /// Only children (or --descendants) of this snapshot (as --from).
        #[arg(value_name = "FROM")]
        from_arg: Option<String>,
        /// Draw the snapshot tree.
        #[arg(long)]
        tree: bool,
        /// Add a Parent column.
        #[arg(long)]
        parent: bool,
        /// Only snapshots without a parent.
        #[arg(long)]
        roots: bool,
        /// Only snapshots without children.
        #[arg(long)]
        leaves: bool,
        /// Only snapshots with children.
        #[arg(long)]
        no_leaves: bool,
        /// Only children (or --descendants) of this snapshot.
        #[arg(long, value_name = "SNAPSHOT")]
        from: Option<String>,
        /// Start from the current snapshot.
        #[arg(long)]
        current: bool,
        /// With --from/--current: all descendants.
        #[arg(long)]
        descendants: bool,
        /// Names only.
        #[arg(long)]
        name: bool,
        /// Parents before children.
        #[arg(long)]
        topological: bool,
        /// Only internal snapshots.
        #[arg(long)]
        internal: bool,
        /// Only external snapshots.
        #[arg(long)]
        external: bool,
        /// Only disk-only snapshots of a running guest.
        #[arg(long)]
        disk_only: bool,
        /// Only snapshots of a running or paused guest.
        #[arg(long)]
        active: bool,
        /// Only snapshots of a stopped domain.
        #[arg(long)]
        inactive: bool,
        /// Only snapshots with metadata: every vmsnap snapshot has it.
        #[arg(long)]
        metadata: bool,
        /// Only snapshots without metadata: vmsnap has none (alone, lists nothing).
        #[arg(long)]
        no_metadata: bool,
    },
    /// Show a snapshot's details.
    #[command(name = "snapshot-info")]
    Info {
        #[command(flatten)]
        target: SnapshotTarget,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
    },
    /// Print a snapshot as libvirt domainsnapshot XML.
    #[command(name = "snapshot-dumpxml")]
    Dumpxml {
        #[command(flatten)]
        target: SnapshotTarget,
        /// Accepted for virsh compatibility: the XML holds no secrets to hide.
        #[arg(long)]
        security_info: bool,
    },
    /// Print a snapshot's parent.
    #[command(name = "snapshot-parent")]
    Parent {
        #[command(flatten)]
        target: SnapshotTarget,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
    },
    /// Show (or set) the current snapshot.
    #[command(name = "snapshot-current")]
    Current {
        #[command(flatten)]
        target: SnapshotTarget,
        /// Print only the name.
        #[arg(long)]
        name: bool,
        /// Accepted for virsh compatibility: the XML holds no secrets to hide.
        #[arg(long)]
        security_info: bool,
    },
    /// Revert the domain to a snapshot.
    #[command(name = "snapshot-revert")]
    Revert {
        #[command(flatten)]
        target: SnapshotTarget,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
        /// Leave the guest running.
        #[arg(long)]
        running: bool,
        /// Leave the guest paused.
        #[arg(long)]
        paused: bool,
        /// Accepted for virsh compatibility.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot.
    #[command(name = "snapshot-delete")]
    Delete {
        #[command(flatten)]
        target: SnapshotTarget,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
        /// Also delete its descendants.
        #[arg(long)]
        children: bool,
        /// Delete only its descendants.
        #[arg(long)]
        children_only: bool,
        /// Forget the snapshot(s) but leave their data alone.
        #[arg(long)]
        metadata: bool,
    },
    /// Finish or roll back what an interrupted vmsnap left on a domain, and remove unneeded files.
    #[command(name = "snapshot-recover")]
    Recover {
        #[command(flatten)]
        domain: DomainArg,
    },
}

/// `DOMAIN` / `--domain`, which every snapshot command takes first.
#[derive(Debug, Args)]
pub struct DomainArg {
    /// Domain name.
    domain: Option<String>,
    /// Domain name (alternative to the positional argument).
    #[arg(long = "domain", value_name = "DOMAIN")]
    domain_opt: Option<String>,
}

impl DomainArg {
    /// The required option for [`place`].
    fn slot(self) -> Slot {
        Slot::new(
            "domain",
            ("domain", self.domain),
            ("domain_opt", self.domain_opt),
        )
        .required()
    }
}

/// `DOMAIN SNAPSHOT` / `--domain --snapshotname`: the snapshot a command
/// works on.
#[derive(Debug, Args)]
pub struct SnapshotTarget {
    #[command(flatten)]
    domain: DomainArg,
    /// Snapshot name.
    snapshot: Option<String>,
    /// Snapshot name (alternative to the positional argument).
    #[arg(long = "snapshotname", value_name = "NAME")]
    snapshotname: Option<String>,
}

impl SnapshotTarget {
    /// The domain and, if given, the snapshot, placed as virsh does;
    /// `snapshot_required` for commands that take no `--current`.
    fn place(self, argv: &Argv<'_>, snapshot_required: bool) -> Result<(String, Option<String>)> {
        let snapshot = Slot::new(
            "snapshotname",
            ("snapshot", self.snapshot),
            ("snapshotname", self.snapshotname),
        );
        let snapshot = if snapshot_required {
            snapshot.required()
        } else {
            snapshot
        };
        let [domain, snapshot] = place(argv, [self.domain.slot(), snapshot])?;
        Ok((needed(domain), single(snapshot)))
    }
}

/// Runs one snapshot command; `matches` is the whole command line as clap
/// parsed it, which tells where each argument stood (see [`place`]).
pub fn run(command: SnapshotCommand, matches: &ArgMatches, globals: &Globals) -> Result<ExitCode> {
    let (name, matches) = matches
        .subcommand()
        .context("no snapshot command on the command line")?;
    let argv = Argv { name, matches };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let host = Host::open(globals.state_dir.as_deref())?;
    let orchestrator = Orchestrator::new(&host)?.wait_for_lock(globals.wait);
    let output = runtime.block_on(execute(command, &argv, &host, &orchestrator, globals.json))?;
    print!("{output}");
    Ok(ExitCode::SUCCESS)
}

/// One snapshot command's arguments as clap parsed them: its name (for
/// virsh's messages) and where each value stood.
struct Argv<'a> {
    name: &'a str,
    matches: &'a ArgMatches,
}

/// One virsh option that takes a value, as clap parsed it: what clap put
/// in the positional argument at the option's place and what came with its
/// `--name`, each under clap's id (to look up where the values stood).
struct Slot {
    /// virsh's name for the option (`domain`, `snapshotname`, `xmlfile`).
    option: &'static str,
    /// The command needs it (virsh's `VSH_OFLAG_REQ`).
    required: bool,
    /// It takes every remaining positional value and may be named again
    /// (virsh's `VSH_OT_ARGV`, `--diskspec`).
    argv: bool,
    positional: (&'static str, Vec<String>),
    named: (&'static str, Vec<String>),
}

impl Slot {
    fn new(
        option: &'static str,
        positional: (&'static str, impl IntoIterator<Item = String>),
        named: (&'static str, impl IntoIterator<Item = String>),
    ) -> Slot {
        Slot {
            option,
            required: false,
            argv: false,
            positional: (positional.0, positional.1.into_iter().collect()),
            named: (named.0, named.1.into_iter().collect()),
        }
    }

    fn required(self) -> Slot {
        Slot {
            required: true,
            ..self
        }
    }

    fn argv(self) -> Slot {
        Slot { argv: true, ..self }
    }
}

/// Gives each value to its option as virsh's parser does
/// (`vshCommandParse`): going through the command line in order, a named
/// value goes to its option, a positional one to the first option (in the
/// command's order) not given yet. An option given twice, a value with no
/// option left, or a required option missing is refused with virsh's words.
fn place<const N: usize>(argv: &Argv<'_>, slots: [Slot; N]) -> Result<[Vec<String>; N]> {
    enum Token {
        Data(String),
        Named(usize, String),
    }
    let at = |id: &str| -> Vec<usize> {
        argv.matches
            .indices_of(id)
            .map(Iterator::collect)
            .unwrap_or_default()
    };
    let mut tokens: Vec<(usize, Token)> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        let (id, values) = &slot.positional;
        let indices = at(id);
        for (k, value) in values.iter().enumerate() {
            let index = indices.get(k).copied().unwrap_or(usize::MAX);
            tokens.push((index, Token::Data(value.clone())));
        }
        let (id, values) = &slot.named;
        let indices = at(id);
        for (k, value) in values.iter().enumerate() {
            let index = indices.get(k).copied().unwrap_or(usize::MAX);
            tokens.push((index, Token::Named(i, value.clone())));
        }
    }
    tokens.sort_by_key(|(index, _)| *index);
    let mut values: [Vec<String>; N] = std::array::from_fn(|_| Vec::new());
    let mut seen = [false; N];
    let mut open = [true; N];
    for (_, token) in tokens {
        let (i, value) = match token {
            Token::Named(i, value) => {
                if seen[i] && !slots[i].argv {
                    bail!("option --{} already seen", slots[i].option);
                }
                (i, value)
            }
            Token::Data(value) => match open.iter().position(|&o| o) {
                Some(i) => (i, value),
                None => bail!("unexpected data '{value}'"),
            },
        };
        seen[i] = true;
        open[i] = slots[i].argv;
        values[i].push(value);
    }
    if let Some(slot) = slots.iter().zip(seen).find(|(s, seen)| s.required && !seen) {
        bail!(
            "command '{}' requires <{}> option",
            argv.name,
            slot.0.option
        );
    }
    Ok(values)
}

/// The one value of an option that is not virsh's `ARGV` kind.
fn single(values: Vec<String>) -> Option<String> {
    values.into_iter().next()
}

/// The value of a required option ([`place`] refused its absence).
fn needed(values: Vec<String>) -> String {
    single(values).unwrap_or_default()
}

/// The creation options `snapshot-create-as` and `snapshot-create` share.
#[derive(Debug, Args)]
pub struct CreateFlags {
    /// Stop the domain's QEMU once the snapshot is taken (as destroy does).
    #[arg(long)]
    halt: bool,
    /// Take the overlays named (--diskspec file=, or the document) as they
    /// exist (empty qcow2 images backed by each disk's active image) instead
    /// of creating them.
    #[arg(long)]
    reuse_external: bool,
    /// Refused: vmsnap has no guest agent to freeze file systems with.
    #[arg(long)]
    quiesce: bool,
    /// Refused: vmsnap records every snapshot it takes.
    #[arg(long)]
    no_metadata: bool,
    /// Accepted for virsh compatibility: snapshots are always atomic.
    #[arg(long)]
    atomic: bool,
    /// Accepted for virsh compatibility: running guests are always snapshotted live.
    #[arg(long)]
    live: bool,
    /// Accepted for virsh compatibility: the request is always validated.
    #[arg(long)]
    validate: bool,
}

impl CreateFlags {
    /// The virsh creation options vmsnap cannot honour, refused before
    /// anything is looked at, each with what to do instead.
    fn refuse_unsupported(&self) -> Result<()> {
        if self.quiesce {
            bail!(
                "--quiesce is not supported: vmsnap has no guest agent to freeze the guest's file systems; \
                 freeze them inside the guest (fsfreeze -f MOUNTPOINT), snapshot without --quiesce, then thaw them (fsfreeze -u)"
            );
        }
        if self.no_metadata {
            bail!(
                "--no-metadata is not supported: vmsnap records every snapshot it takes; \
                 create it without --no-metadata, then forget it and keep its data with `vmsnap snapshot-delete DOMAIN NAME --metadata`"
            );
        }
        Ok(())
    }
}

/// A progress bar on stderr, drawn only on a terminal.
struct Bars {
    bar: Mutex<Option<(String, ProgressBar)>>,
    enabled: bool,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            bar: Mutex::new(None),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, progress: Progress<'_>) {
        if !self.enabled {
            return;
        }
        let mut slot = self.bar.lock().expect("progress lock");
        let fresh = !matches!(&*slot, Some((step, _)) if step == progress.step);
        if fresh {
            if let Some((_, old)) = slot.take() {
                old.finish_and_clear();
            }
            let bar = ProgressBar::new(progress.total.max(1));
            let style = if progress.total > 1 {
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            } else {
                ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            };
            if let Ok(style) = style {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(progress.step.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            *slot = Some((progress.step.to_string(), bar));
        }
        if let Some((_, bar)) = &*slot {
            if progress.total > 1 {
                bar.set_length(progress.total);
                bar.set_position(progress.done);
            }
        }
    }

    fn finish(&self) {
        if let Some((_, bar)) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}

/// The snapshot a `SNAPSHOT | --current` command works on
/// (`virshLookupSnapshot`), with virsh's and libvirt's messages.
fn resolve_name(
    orchestrator: &Orchestrator<'_>,
    domain: &str,
    snapshot: Option<String>,
    current: bool,
) -> Result<String> {
    match (snapshot, current) {
        (Some(name), false) => Ok(name),
        (Some(_), true) => bail!("--snapshotname and --current are mutually exclusive"),
        (None, false) => bail!("--snapshotname or --current is required"),
        (None, true) => Ok(orchestrator
            .tree(domain)?
            .resolve(None, true, "snapshotname")?
            .name
            .clone()),
    }
}

fn meta_json(meta: &SnapshotMeta, tree: &SnapshotTree) -> serde_json::Value {
    json!({
        "name": meta.name,
        "domain": meta.domain,
        "description": meta.description,
        "parent": meta.parent,
        "creation_time": meta.creation_time,
        "state": meta.state.as_str(),
        "kind": meta.kind().as_str(),
        "location": if meta.is_external() { "external" } else { "internal" },
        "current": meta.is_current,
        "children": tree.children(&meta.name).map(|c| c.len()).unwrap_or(0),
        "descendants": tree.descendants(&meta.name).map(|c| c.len()).unwrap_or(0),
        "memory": meta.memory,
        "disks": meta.disks,
    })
}

async fn execute(
    command: SnapshotCommand,
    argv: &Argv<'_>,
    host: &Host,
    orchestrator: &Orchestrator<'_>,
    json_output: bool,
) -> Result<String> {
    let bars = Bars::new();
    let progress = |p: Progress<'_>| bars.update(p);
    match command {
        SnapshotCommand::CreateAs {
            domain,
            name,
            description,
            diskspec_args,
            name_flag,
            description_flag,
            disk_only,
            memspec,
            diskspec,
            external,
            print_xml,
            flags,
        } => {
            let [domain, name, description, diskspec] = place(
                argv,
                [
                    domain.slot(),
                    Slot::new("name", ("name", name), ("name_flag", name_flag)),
                    Slot::new(
                        "description",
                        ("description", description),
                        ("description_flag", description_flag),
                    ),
                    Slot::new(
                        "diskspec",
                        ("diskspec_args", diskspec_args),
                        ("diskspec", diskspec),
                    )
                    .argv(),
                ],
            )?;
            let domain = needed(domain);
            if print_xml {
                // virsh looks the domain up, then prints what it would send.
                host.domain(&domain)?;
                let xml = create_as_request_xml(
                    name.first().map(String::as_str),
                    description.first().map(String::as_str),
                    memspec.as_deref(),
                    &diskspec,
                )?;
                return Ok(render::render_request_xml(&xml));
            }
            flags.refuse_unsupported()?;
            let request = CreateRequest {
                name: single(name),
                description: single(description),
                disk_only,
                memspec: memspec.as_deref().map(MemSpec::parse).transpose()?,
                diskspecs: diskspec
                    .iter()
                    .map(|s| DiskSpec::parse(s))
                    .collect::<Result<_, _>>()?,
                external,
                halt: flags.halt,
                reuse_external: flags.reuse_external,
            };
            let outcome = orchestrator.create(&domain, &request, &progress).await;
            bars.finish();
            let outcome = outcome?;
            if json_output {
                return Ok(serde_json::to_string_pretty(&json!({
                    "name": outcome.name,
                    "kind": outcome.kind.as_str(),
                    "pause_ms": outcome.pause_ms,
                    "background": outcome.background,
                    "notes": outcome.notes,
                }))? + "\n");
            }
            for note in &outcome.notes {
                eprintln!("note: {note}");
            }
            Ok(render::msg_created(&outcome.name))
        }
        SnapshotCommand::Create {
            domain,
            file,
            xmlfile,
            redefine,
            current,
            disk_only,
            flags,
        } => {
            let [domain, file] = place(
                argv,
                [
                    domain.slot(),
                    Slot::new("xmlfile", ("file", file), ("xmlfile", xmlfile)),
                ],
            )?;
            let (domain, file) = (needed(domain), single(file));
            flags.refuse_unsupported()?;
            if current && !redefine {
                bail!("--current needs --redefine");
            }
            if redefine && flags.halt {
                // libvirt's rule: a redefinition only records metadata.
                bail!("Options --redefine and --halt are mutually exclusive");
            }
            let Some(file) = file else {
                if redefine {
                    bail!("--redefine needs the snapshot's XML: give --xmlfile FILE");
                }
                // virsh sends `<domainsnapshot/>`: a snapshot with every
                // default, as snapshot-create-as DOM takes.
                let request = CreateRequest {
                    disk_only,
                    halt: flags.halt,
                    reuse_external: flags.reuse_external,
                    ..CreateRequest::default()
                };
                let outcome = orchestrator.create(&domain, &request, &progress).await;
                bars.finish();
                let outcome = outcome?;
                for note in &outcome.notes {
                    eprintln!("note: {note}");
                }
                return Ok(render::msg_created(&outcome.name));
            };
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?;
            let (_, definition) = parse_snapshot_document(&text)?;
            if redefine {
                let vm = host.domain(&domain)?;
                let disks: Vec<DomainDiskSource> = vm
                    .disks()
                    .iter()
                    .filter_map(|chain| {
                        chain.active().map(|layer| DomainDiskSource {
                            target: chain.target.clone(),
                            file: layer.path.clone(),
                            format: layer.format.as_str().to_string(),
                        })
                    })
                    .collect();
                let meta =
                    definition.into_redefined_meta(&domain, &vm.config().to_toml(), &disks)?;
                let name = meta.name.clone();
                orchestrator.redefine(&domain, meta, current)?;
                return Ok(render::msg_created_from(&name, &file));
            }
            let memspec = definition.memory.as_ref().map(|m| MemSpec {
                mode: m.mode,
                file: m.file.clone(),
            });
            if let Some(memory) = memspec.as_ref().filter(|m| m.mode != DiskSnapshotMode::No) {
                if disk_only {
                    bail!(
                        "--disk-only takes no memory, but {file} asks for <memory snapshot='{}'>: drop one of them",
                        memory.mode.as_str()
                    );
                }
            }
            let request = CreateRequest {
                name: definition.name.clone(),
                description: definition.description.clone(),
                disk_only: disk_only
                    || memspec
                        .as_ref()
                        .is_some_and(|m| m.mode == DiskSnapshotMode::No),
                memspec: memspec.filter(|m| m.mode != DiskSnapshotMode::No),
                diskspecs: definition
                    .disks
                    .iter()
                    .map(|d| DiskSpec {
                        target: d.target.clone(),
                        mode: d.mode,
                        file: d.file.clone(),
                    })
                    .collect(),
                external: false,
                halt: flags.halt,
                reuse_external: flags.reuse_external,
            };
            let outcome = orchestrator.create(&domain, &request, &progress).await;
            bars.finish();
            let outcome = outcome?;
            for note in &outcome.notes {
                eprintln!("note: {note}");
            }
            Ok(render::msg_created_from(&outcome.name, &file))
        }
        SnapshotCommand::List {
            domain,
            from_arg,
            tree,
            parent,
            roots,
            leaves,
            no_leaves,
            from,
            current,
            descendants,
            name,
            topological,
            internal,
            external,
            disk_only,
            active,
            inactive,
            metadata,
            no_metadata,
        } => {
            let [domain, from] = place(
                argv,
                [
                    domain.slot(),
                    Slot::new("from", ("from_arg", from_arg), ("from", from)),
                ],
            )?;
            let (domain, from) = (needed(domain), single(from));
            // A killed vmsnap may have left an operation half done: finish
            // or roll it back first, unless another command holds the domain.
            match orchestrator.recover_if_interrupted(&domain).await {
                Ok(notes) => notes.iter().for_each(|n| eprintln!("note: {n}")),
                Err(err) if err.kind() == ErrorKind::Conflict => {}
                Err(err) if is_store_full(&err) => eprintln!(
                    "warning: listing domain {domain} without finishing its interrupted operation: {err}"
                ),
                Err(err) => return Err(err.into()),
            }
            let snapshots = orchestrator.tree(&domain)?;
            let from = match (from, current) {
                (None, false) => None,
                (from, current) => Some(
                    snapshots
                        .resolve(from.as_deref(), current, "from")?
                        .name
                        .clone(),
                ),
            };
            let query = ListQuery {
                from: from.clone(),
                descendants,
                roots,
                leaves,
                no_leaves,
                active,
                inactive,
                disk_only,
                internal,
                external,
                topological,
            };
            query.check_options(ListOutputOptions {
                tree,
                name,
                parent,
                current,
            })?;
            // virsh filters on libvirt's metadata, which every vmsnap
            // snapshot has: --no-metadata alone matches none, and with
            // --metadata too it is no filter at all, as libvirt takes it.
            let none_match = no_metadata && !metadata;
            if tree {
                let mut entries = snapshots.tree_entries(from.as_deref())?;
                if none_match {
                    // virsh still draws the --from snapshot it starts at.
                    entries.retain(|e| Some(&e.name) == from.as_ref());
                }
                if json_output {
                    let list: Vec<_> = entries
                        .iter()
                        .map(|e| json!({"name": e.name, "parent": e.parent}))
                        .collect();
                    return Ok(serde_json::to_string_pretty(&list)? + "\n");
                }
                return Ok(render::render_tree(&entries));
            }
            let mut picked = snapshots.list(&query)?;
            if none_match {
                picked.clear();
            }
            if json_output {
                let list: Vec<_> = picked.iter().map(|m| meta_json(m, &snapshots)).collect();
                return Ok(serde_json::to_string_pretty(&list)? + "\n");
            }
            if name {
                return Ok(render::render_list_names(&picked));
            }
            Ok(render::render_list_table(&picked, parent, TimeZone::Local))
        }
        SnapshotCommand::Info { target, current } => {
            let (domain, snapshot) = target.place(argv, false)?;
            let name = resolve_name(orchestrator, &domain, snapshot, current)?;
            let tree = orchestrator.tree(&domain)?;
            let meta = orchestrator.get(&domain, &name)?.meta;
            if json_output {
                return Ok(serde_json::to_string_pretty(&meta_json(&meta, &tree))? + "\n");
            }
            Ok(render::render_info(&tree, &meta))
        }
        SnapshotCommand::Dumpxml {
            target,
            security_info: _,
        } => {
            let (domain, snapshot) = target.place(argv, true)?;
            let meta = orchestrator
                .get(&domain, &snapshot.unwrap_or_default())?
                .meta;
            Ok(render::render_xml(&snapshot_to_xml(&meta)))
        }
        SnapshotCommand::Parent { target, current } => {
            let (domain, snapshot) = target.place(argv, false)?;
            let name = resolve_name(orchestrator, &domain, snapshot, current)?;
            let meta = orchestrator.get(&domain, &name)?.meta;
            match meta.parent {
                Some(parent) => Ok(render::render_name(&parent)),
                None => Err(SnapshotMetaError::NoParent { name }.into()),
            }
        }
        SnapshotCommand::Current {
            target,
            name,
            security_info: _,
        } => {
            let (domain, snapshot) = target.place(argv, false)?;
            if let Some(snapshot) = snapshot {
                if name {
                    bail!("Options --name and --snapshotname are mutually exclusive");
                }
                orchestrator.set_current(&domain, &snapshot)?;
                return Ok(render::msg_set_current(&snapshot));
            }
            let tree = orchestrator.tree(&domain)?;
            let current = tree.current_name(&domain)?;
            if name {
                return Ok(render::render_name(current));
            }
            let meta = orchestrator.get(&domain, current)?.meta;
            Ok(render::render_xml(&snapshot_to_xml(&meta)))
        }
        SnapshotCommand::Revert {
            target,
            current,
            running,
            paused,
            force: _,
        } => {
            let (domain, snapshot) = target.place(argv, false)?;
            let name = resolve_name(orchestrator, &domain, snapshot, current)?;
            let mode = match (running, paused) {
                (true, true) => bail!("--running and --paused are mutually exclusive"),
                (true, false) => RevertMode::Running,
                (false, true) => RevertMode::Paused,
                (false, false) => RevertMode::AsRecorded,
            };
            let outcome = orchestrator.revert(&domain, &name, mode, &progress).await;
            bars.finish();
            let outcome = outcome?;
            for note in &outcome.notes {
                eprintln!("note: {note}");
            }
            if json_output {
                return Ok(serde_json::to_string_pretty(&outcome)? + "\n");
            }
            Ok(render::msg_reverted(&name))
        }
        SnapshotCommand::Delete {
            target,
            current,
            children,
            children_only,
            metadata,
        } => {
            let (domain, snapshot) = target.place(argv, false)?;
            let name = resolve_name(orchestrator, &domain, snapshot, current)?;
            let scope = match (children, children_only) {
                (true, true) => bail!("--children and --children-only are mutually exclusive"),
                (true, false) => DeleteScope::WithChildren,
                (false, true) => DeleteScope::ChildrenOnly,
                (false, false) => DeleteScope::Node,
            };
            let outcome = orchestrator
                .delete(&domain, &name, scope, metadata, &progress)
                .await;
            bars.finish();
            let outcome = outcome?;
            for note in &outcome.notes {
                eprintln!("note: {note}");
            }
            if json_output {
                return Ok(serde_json::to_string_pretty(&outcome)? + "\n");
            }
            Ok(if children_only {
                render::msg_children_deleted(&name)
            } else {
                render::msg_deleted(&name)
            })
        }
        SnapshotCommand::Recover { domain } => {
            let [domain] = place(argv, [domain.slot()])?;
            let domain = needed(domain);
            let notes = orchestrator.recover(&domain).await?;
            if json_output {
                return Ok(serde_json::to_string_pretty(&notes)? + "\n");
            }
            if notes.is_empty() {
                return Ok(format!("Domain {domain} needs no recovery\n\n"));
            }
            Ok(notes.iter().map(|n| format!("{n}\n")).collect::<String>() + "\n")
        }
    }
}
