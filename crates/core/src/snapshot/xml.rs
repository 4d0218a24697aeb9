//! libvirt domainsnapshot XML: `snapshot-dumpxml` output that validates
//! against libvirt's `domainsnapshot.rng`, and the parser behind
//! `snapshot-create DOM FILE` (plain and `--redefine`).
//!
//! libvirt's meaning is kept: a disk's `<source file=>` in `<disks>` is the
//! new overlay of an external snapshot, and the images the snapshot froze
//! (or holds internal snapshots in) are the disk sources of the embedded
//! `<domain>`, the domain as it was when the snapshot was taken.

use std::path::PathBuf;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::error::SnapshotMetaError;
use super::meta::{
    DiskSnapshotMode, DiskSnapshotRecord, MemorySnapshot, SnapshotMeta, SnapshotState,
};
use super::name::validate_snapshot_name;

/// Where memory should go, as a definition asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRequest {
    /// `no` (disk-only), `internal` or `external`.
    pub mode: DiskSnapshotMode,
    /// The memory file, for external.
    pub file: Option<PathBuf>,
}

/// One disk as a definition asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    /// The disk's target (`vda`) — libvirt also accepts the disk's
    /// image path here.
    pub target: String,
    /// How to snapshot it; `None` leaves it to the snapshot's default.
    pub mode: Option<DiskSnapshotMode>,
    /// External: the overlay's path.
    pub file: Option<PathBuf>,
    /// External: the overlay's format (`qcow2`).
    pub driver: Option<String>,
}

/// A disk of the domain embedded in snapshot XML: the image the snapshot
/// refers to (frozen for external, holding the snapshot for internal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDiskSource {
    /// Target (`vda`).
    pub target: String,
    /// The image's absolute path.
    pub file: PathBuf,
    /// Its format (`raw`, `qcow2`), never guessed.
    pub format: String,
}

/// What a snapshot document (libvirt XML or xl config) asks for. Plain
/// `snapshot-create` uses the request fields; `--redefine` also needs the
/// recorded ones (state, parent, creation time, the domain's disks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDefinition {
    /// `<name>`; `None` lets the creator pick one (virsh uses the time).
    pub name: Option<String>,
    /// `<description>`.
    pub description: Option<String>,
    /// `<memory>`; `None` means the default (memory of a running guest,
    /// placed like the disks).
    pub memory: Option<MemoryRequest>,
    /// `<disks>`, in document order.
    pub disks: Vec<DiskRequest>,
    /// `<state>` (redefine).
    pub state: Option<SnapshotState>,
    /// `<parent><name>` (redefine).
    pub parent: Option<String>,
    /// `<creationTime>` (redefine).
    pub creation_time: Option<i64>,
    /// `<active>` (redefine: whether the domain was running).
    pub active: Option<bool>,
    /// Disks of the embedded `<domain>` (redefine: the images to refer to).
    pub domain_disks: Vec<DomainDiskSource>,
    /// vmsnap's cookie: which disk holds an internal snapshot's vmstate.
    pub vmstate_disk: Option<String>,
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path_attr(path: &std::path::Path) -> String {
    escape(&path.to_string_lossy())
}

/// The few domain facts libvirt's parser insists on, read leniently from
/// the domain config TOML kept with the snapshot (absent keys are left out).
struct DomainFacts {
    kvm: bool,
    uuid: Option<String>,
    memory_mib: Option<u64>,
    hugepages: bool,
    vcpus: Option<u64>,
}

fn domain_facts(domain_config: &str) -> DomainFacts {
    let value = toml::from_str::<toml::Value>(domain_config).ok();
    let get = |key: &str| value.as_ref().and_then(|v| v.get(key));
    DomainFacts {
        kvm: get("accel").and_then(toml::Value::as_str) == Some("kvm"),
        uuid: get("uuid")
            .and_then(toml::Value::as_str)
            .map(str::to_string),
        memory_mib: get("memory_mib")
            .and_then(toml::Value::as_integer)
            .and_then(|n| u64::try_from(n).ok()),
        hugepages: get("hugepages").and_then(toml::Value::as_bool) == Some(true),
        vcpus: get("vcpus")
            .and_then(toml::Value::as_integer)
            .and_then(|n| u64::try_from(n).ok()),
    }
}

/// `snapshot-dumpxml`: the snapshot as libvirt domainsnapshot XML, laid
/// out like libvirt's formatter (two-space indent, single quotes).
pub fn snapshot_to_xml(meta: &SnapshotMeta) -> String {
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", escape(&meta.name)));
    if let Some(d) = &meta.description {
        x.push_str(&format!("  <description>{}</description>\n", escape(d)));
    }
    x.push_str(&format!("  <state>{}</state>\n", meta.state.as_str()));
    if let Some(p) = &meta.parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            escape(p)
        ));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        meta.creation_time
    ));
    match &meta.memory {
        MemorySnapshot::None => x.push_str("  <memory snapshot='no'/>\n"),
        MemorySnapshot::Internal { .. } => x.push_str("  <memory snapshot='internal'/>\n"),
        MemorySnapshot::External { path } => x.push_str(&format!(
            "  <memory snapshot='external' file='{}'/>\n",
            path_attr(path)
        )),
    }
    x.push_str("  <disks>\n");
    for d in &meta.disks {
        let name = escape(&d.target);
        match (d.mode, &d.overlay) {
            (DiskSnapshotMode::External, Some(overlay)) => {
                x.push_str(&format!(
                    "    <disk name='{name}' snapshot='external' type='file'>\n"
                ));
                let format = d.overlay_format.as_deref().unwrap_or("qcow2");
                x.push_str(&format!("      <driver type='{}'/>\n", escape(format)));
                x.push_str(&format!("      <source file='{}'/>\n", path_attr(overlay)));
                x.push_str("    </disk>\n");
            }
            (mode, _) => x.push_str(&format!(
                "    <disk name='{name}' snapshot='{}'/>\n",
                mode.as_str()
            )),
        }
    }
    x.push_str("  </disks>\n");
    let facts = domain_facts(&meta.domain_config);
    x.push_str(&format!(
        "  <domain type='{}'>\n    <name>{}</name>\n",
        if facts.kvm { "kvm" } else { "qemu" },
        escape(&meta.domain)
    ));
    if let Some(uuid) = &facts.uuid {
        x.push_str(&format!("    <uuid>{}</uuid>\n", escape(uuid)));
    }
    if let Some(mib) = facts.memory_mib {
        x.push_str(&format!("    <memory unit='MiB'>{mib}</memory>\n"));
    }
    if facts.hugepages {
        x.push_str("    <memoryBacking>\n      <hugepages/>\n      <allocation mode='immediate'/>\n    </memoryBacking>\n");
    }
    if let Some(vcpus) = facts.vcpus {
        x.push_str(&format!("    <vcpu>{vcpus}</vcpu>\n"));
    }
    x.push_str("    <os>\n      <type>hvm</type>\n    </os>\n    <devices>\n");
    for d in &meta.disks {
        x.push_str("      <disk type='file' device='disk'>\n");
        x.push_str(&format!(
            "        <driver name='qemu' type='{}'/>\n",
            escape(&d.source_format)
        ));
        x.push_str(&format!(
            "        <source file='{}'/>\n",
            path_attr(&d.source)
        ));
        x.push_str(&format!("        <target dev='{}'/>\n", escape(&d.target)));
        x.push_str("      </disk>\n");
    }
    x.push_str("    </devices>\n  </domain>\n");
    if let MemorySnapshot::Internal { vmstate_disk } = &meta.memory {
        x.push_str(&format!(
            "  <cookie>\n    <vmstate disk='{}'/>\n  </cookie>\n",
            escape(vmstate_disk)
        ));
    }
    x.push_str("</domainsnapshot>\n");
    x
}

/// Splits a `--memspec`/`--diskspec` value as virsh's `vshStringToArray`
/// does: on single commas, `,,` standing for a literal comma.
fn virsh_items(text: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            }
            ',' => items.push(String::new()),
            c => items.last_mut().expect("never empty").push(c),
        }
    }
    items
}

/// Text for an XML element or quoted attribute, as libvirt's
/// `virBufferEscapeString` writes it: markup characters escaped and control
/// characters other than tab and line breaks dropped.
fn virsh_escape(text: &str) -> String {
    let kept: String = text
        .chars()
        .filter(|&c| u32::from(c) >= 0x20 || matches!(c, '\t' | '\n' | '\r'))
        .collect();
    escape(&kept)
}

/// Fills an empty `slot` with the value of an item starting with `key`
/// (virsh keeps the first); false when the item is not one for it.
fn take_item<'a>(item: &'a str, key: &str, slot: &mut Option<&'a str>) -> bool {
    match item.strip_prefix(key) {
        Some(value) if slot.is_none() => {
            *slot = Some(value);
            true
        }
        _ => false,
    }
}

/// `snapshot-create-as --print-xml`: the domainsnapshot document virsh
/// builds from `--name`, `--description`, `--memspec` and each
/// `--diskspec` and would hand to libvirt, laid out as virsh lays it out
/// (two-space indent, elements only for what was given), so a script that
/// saves it for `snapshot-create` gets what virsh gives. Values are taken
/// as virsh takes them, unchecked (creating from the document checks
/// them); unlike virsh, `snapshot=`, `driver=` and `stype=` values are
/// escaped too, so the document is always well-formed. Ends in a newline;
/// virsh prints one more after it.
pub fn create_as_request_xml(
    name: Option<&str>,
    description: Option<&str>,
    memspec: Option<&str>,
    diskspecs: &[String],
) -> Result<String, SnapshotMetaError> {
    let mut x = String::from("<domainsnapshot>\n");
    if let Some(name) = name {
        x.push_str(&format!("  <name>{}</name>\n", virsh_escape(name)));
    }
    if let Some(description) = description {
        x.push_str(&format!(
            "  <description>{}</description>\n",
            virsh_escape(description)
        ));
    }
    if let Some(spec) = memspec {
        let bad = || SnapshotMetaError::BadOptions(format!("unable to parse memspec: {spec}"));
        let items = virsh_items(spec);
        let (mut snapshot, mut file) = (None, None);
        for item in &items {
            let taken = take_item(item, "snapshot=", &mut snapshot)
                || take_item(item, "file=", &mut file)
                || (file.is_none() && item.starts_with('/') && {
                    file = Some(item.as_str());
                    true
                });
            if !taken {
                return Err(bad());
            }
        }
        x.push_str("  <memory");
        if let Some(snapshot) = snapshot {
            x.push_str(&format!(" snapshot='{}'", virsh_escape(snapshot)));
        }
        if let Some(file) = file {
            x.push_str(&format!(" file='{}'", virsh_escape(file)));
        }
        x.push_str("/>\n");
    }
    if !diskspecs.is_empty() {
        x.push_str("  <disks>\n");
        for spec in diskspecs {
            let bad = || SnapshotMetaError::BadOptions(format!("unable to parse diskspec: {spec}"));
            let items = virsh_items(spec);
            let (mut snapshot, mut driver, mut stype, mut file) = (None, None, None, None);
            for item in &items[1..] {
                let taken = take_item(item, "snapshot=", &mut snapshot)
                    || take_item(item, "driver=", &mut driver)
                    || take_item(item, "stype=", &mut stype)
                    || take_item(item, "file=", &mut file);
                if !taken {
                    return Err(bad());
                }
            }
            x.push_str(&format!("    <disk name='{}'", virsh_escape(&items[0])));
            if let Some(snapshot) = snapshot {
                x.push_str(&format!(" snapshot='{}'", virsh_escape(snapshot)));
            }
            let source = match stype {
                None | Some("file") => "file",
                Some("block") => "dev",
                Some(other) => {
                    return Err(SnapshotMetaError::BadOptions(format!(
                        "Unknown storage type: '{other}'"
                    )))
                }
            };
            if let Some(stype) = stype {
                x.push_str(&format!(" type='{stype}'"));
            }
            if driver.is_none() && file.is_none() {
                x.push_str("/>\n");
                continue;
            }
            x.push_str(">\n");
            if let Some(driver) = driver {
                x.push_str(&format!(
                    "      <driver type='{}'/>\n",
                    virsh_escape(driver)
                ));
            }
            if let Some(file) = file {
                x.push_str(&format!(
                    "      <source {source}='{}'/>\n",
                    virsh_escape(file)
                ));
            }
            x.push_str("    </disk>\n");
        }
        x.push_str("  </disks>\n");
    }
    x.push_str("</domainsnapshot>\n");
    Ok(x)
}

/// The line (1-based) of a byte offset, for error messages.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn xml_err(text: &str, offset: usize, msg: impl std::fmt::Display) -> SnapshotMetaError {
    SnapshotMetaError::Xml(format!("line {}: {msg}", line_of(text, offset)))
}

/// Attributes of an element as (name, unescaped value) pairs.
fn attributes(
    text: &str,
    offset: usize,
    e: &BytesStart<'_>,
) -> Result<Vec<(String, String)>, SnapshotMetaError> {
    let mut out = Vec::new();
    for attr in e.attributes() {
        let attr = attr.map_err(|err| xml_err(text, offset, err))?;
        let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|err| xml_err(text, offset, err))?
            .into_owned();
        out.push((key, value));
    }
    Ok(out)
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn parse_mode(
    text: &str,
    offset: usize,
    what: &str,
    value: &str,
) -> Result<DiskSnapshotMode, SnapshotMetaError> {
    match value {
        "manual" => Err(xml_err(
            text,
            offset,
            format!("{what}: snapshot='manual' is not supported; use internal, external or no"),
        )),
        v => DiskSnapshotMode::parse(v).ok_or_else(|| {
            xml_err(
                text,
                offset,
                format!("{what}: snapshot='{v}' is not one of internal, external, no"),
            )
        }),
    }
}

fn absolute_path(
    text: &str,
    offset: usize,
    what: &str,
    value: &str,
) -> Result<PathBuf, SnapshotMetaError> {
    let path = PathBuf::from(value);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(xml_err(
            text,
            offset,
            format!("{what}: file '{value}' must be an absolute path"),
        ))
    }
}

/// Parses libvirt domainsnapshot XML (`snapshot-create DOM FILE`).
/// Unknown elements are ignored as libvirt ignores them; values we cannot
/// honour (block or network disks, `manual`, unknown states) are errors.
pub fn parse_snapshot_xml(text: &str) -> Result<SnapshotDefinition, SnapshotMetaError> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(true);
    let mut def = SnapshotDefinition::default();
    let mut path: Vec<String> = Vec::new();
    let mut saw_root = false;
    // The disk (snapshot or domain) whose children are being read.
    let mut snap_disk: Option<DiskRequest> = None;
    let mut dom_disk: Option<OpenDomainDisk> = None;
    loop {
        let offset = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let event = reader
            .read_event()
            .map_err(|err| xml_err(text, offset, err))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if path.is_empty() {
                    if saw_root {
                        return Err(xml_err(text, offset, "more than one root element"));
                    }
                    if name != "domainsnapshot" {
                        return Err(xml_err(
                            text,
                            offset,
                            format!("the root element is <{name}>, expected <domainsnapshot>"),
                        ));
                    }
                    saw_root = true;
                }
                path.push(name);
                let attrs = attributes(text, offset, e)?;
                let p: Vec<&str> = path.iter().map(String::as_str).collect();
                match p.as_slice() {
                    ["domainsnapshot", "memory"] => {
                        let mode = match attr(&attrs, "snapshot") {
                            Some(m) => parse_mode(text, offset, "<memory>", m)?,
                            None if attr(&attrs, "file").is_some() => DiskSnapshotMode::External,
                            None => {
                                return Err(xml_err(
                                    text,
                                    offset,
                                    "<memory> needs snapshot='no|internal|external' or file=",
                                ))
                            }
                        };
                        let file = attr(&attrs, "file")
                            .map(|f| absolute_path(text, offset, "<memory>", f))
                            .transpose()?;
                        match (mode, &file) {
                            (DiskSnapshotMode::External, None) => {
                                return Err(xml_err(
                                    text,
                                    offset,
                                    "<memory snapshot='external'> needs file=",
                                ))
                            }
                            (DiskSnapshotMode::Internal | DiskSnapshotMode::No, Some(_)) => {
                                return Err(xml_err(
                                    text,
                                    offset,
                                    format!("<memory snapshot='{}'> takes no file=", mode.as_str()),
                                ))
                            }
                            _ => {}
                        }
                        def.memory = Some(MemoryRequest { mode, file });
                    }
                    ["domainsnapshot", "disks", "disk"] => {
                        let target = attr(&attrs, "name")
                            .filter(|n| !n.is_empty())
                            .ok_or_else(|| xml_err(text, offset, "<disk> needs a name="))?
                            .to_string();
                        let what = format!("<disk name='{target}'>");
                        let mode = attr(&attrs, "snapshot")
                            .map(|m| parse_mode(text, offset, &what, m))
                            .transpose()?;
                        if let Some(t) = attr(&attrs, "type") {
                            if t != "file" {
                                return Err(xml_err(
                                    text,
                                    offset,
                                    format!("{what}: type='{t}' is not supported; only file disks"),
                                ));
                            }
                        }
                        let disk = DiskRequest {
                            target,
                            mode,
                            file: None,
                            driver: None,
                        };
                        if empty {
                            def.disks.push(disk);
                        } else {
                            snap_disk = Some(disk);
                        }
                    }
                    ["domainsnapshot", "disks", "disk", "source"] => {
                        if let Some(disk) = snap_disk.as_mut() {
                            let what = format!("<disk name='{}'>", disk.target);
                            if attr(&attrs, "dev").is_some() || attr(&attrs, "protocol").is_some() {
                                return Err(xml_err(
                                    text,
                                    offset,
                                    format!("{what}: only file sources are supported"),
                                ));
                            }
                            disk.file = attr(&attrs, "file")
                                .map(|f| absolute_path(text, offset, &what, f))
                                .transpose()?;
                        }
                    }
                    ["domainsnapshot", "disks", "disk", "driver"] => {
                        if let Some(disk) = snap_disk.as_mut() {
                            disk.driver = attr(&attrs, "type").map(str::to_string);
                        }
                    }
                    ["domainsnapshot", "domain", "devices", "disk"] => {
                        let device = attr(&attrs, "device").unwrap_or("disk");
                        if device == "disk" {
                            dom_disk = Some(OpenDomainDisk {
                                at: offset,
                                ..Default::default()
                            });
                        }
                    }
                    ["domainsnapshot", "domain", "devices", "disk", "source"] => {
                        if let Some(d) = dom_disk.as_mut() {
                            d.file = attr(&attrs, "file").map(str::to_string);
                        }
                    }
                    ["domainsnapshot", "domain", "devices", "disk", "driver"] => {
                        if let Some(d) = dom_disk.as_mut() {
                            d.format = attr(&attrs, "type").map(str::to_string);
                        }
                    }
                    ["domainsnapshot", "domain", "devices", "disk", "target"] => {
                        if let Some(d) = dom_disk.as_mut() {
                            d.target = attr(&attrs, "dev").map(str::to_string);
                        }
                    }
                    ["domainsnapshot", "cookie", "vmstate"] => {
                        def.vmstate_disk = attr(&attrs, "disk").map(str::to_string);
                    }
                    _ => {}
                }
                if empty {
                    close_element(
                        text,
                        offset,
                        &mut path,
                        &mut def,
                        &mut snap_disk,
                        &mut dom_disk,
                    )?;
                }
            }
            Event::End(_) => {
                close_element(
                    text,
                    offset,
                    &mut path,
                    &mut def,
                    &mut snap_disk,
                    &mut dom_disk,
                )?;
            }
            Event::Text(ref t) => {
                let value = t.unescape().map_err(|err| xml_err(text, offset, err))?;
                set_text(text, offset, &path, &mut def, &value)?;
            }
            Event::CData(ref c) => {
                let value = String::from_utf8_lossy(c.as_ref()).into_owned();
                set_text(text, offset, &path, &mut def, &value)?;
            }
            Event::Eof => {
                if let Some(open) = path.last() {
                    return Err(xml_err(
                        text,
                        offset,
                        format!("the document ends inside <{open}>"),
                    ));
                }
                break;
            }
            _ => {}
        }
    }
    if !saw_root {
        return Err(SnapshotMetaError::Xml(
            "the document has no <domainsnapshot> element".into(),
        ));
    }
    Ok(def)
}

/// A `<disk>` of the embedded `<domain>` being read.
#[derive(Default)]
struct OpenDomainDisk {
    file: Option<String>,
    format: Option<String>,
    target: Option<String>,
    /// Byte offset of its start tag, for errors.
    at: usize,
}

fn close_element(
    text: &str,
    offset: usize,
    path: &mut Vec<String>,
    def: &mut SnapshotDefinition,
    snap_disk: &mut Option<DiskRequest>,
    dom_disk: &mut Option<OpenDomainDisk>,
) -> Result<(), SnapshotMetaError> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["domainsnapshot", "disks", "disk"] => {
            if let Some(disk) = snap_disk.take() {
                def.disks.push(disk);
            }
        }
        ["domainsnapshot", "domain", "devices", "disk"] => {
            if let Some(OpenDomainDisk {
                file,
                format,
                target,
                at,
            }) = dom_disk.take()
            {
                // Disks without a file source (empty CD-ROMs) refer to no
                // image; without a driver type (libvirt's test driver) the
                // format is unknown and never guessed: the domain's
                // configured disks stand in for such entries on redefine.
                if let (Some(file), Some(format), Some(target)) = (file, format, target) {
                    def.domain_disks.push(DomainDiskSource {
                        target,
                        file: absolute_path(text, at, "domain <disk>", &file)?,
                        format,
                    });
                }
            }
        }
        _ => {}
    }
    if path.pop().is_none() {
        return Err(xml_err(text, offset, "unbalanced closing tag"));
    }
    Ok(())
}

fn set_text(
    text: &str,
    offset: usize,
    path: &[String],
    def: &mut SnapshotDefinition,
    value: &str,
) -> Result<(), SnapshotMetaError> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["domainsnapshot", "name"] => def.name = Some(value.to_string()),
        ["domainsnapshot", "description"] => def.description = Some(value.to_string()),
        ["domainsnapshot", "state"] => {
            def.state = Some(SnapshotState::parse(value).ok_or_else(|| {
                xml_err(
                    text,
                    offset,
                    format!(
                        "<state>{value}</state> is not supported; use running, paused, shutoff or disk-snapshot"
                    ),
                )
            })?)
        }
        ["domainsnapshot", "parent", "name"] => def.parent = Some(value.to_string()),
        ["domainsnapshot", "creationTime"] => {
            def.creation_time = Some(value.trim().parse().map_err(|_| {
                xml_err(
                    text,
                    offset,
                    format!("<creationTime>{value}</creationTime> is not a number of seconds"),
                )
            })?)
        }
        ["domainsnapshot", "active"] => {
            def.active = Some(match value.trim() {
                "1" => true,
                "0" => false,
                other => {
                    return Err(xml_err(
                        text,
                        offset,
                        format!("<active>{other}</active> must be 0 or 1"),
                    ))
                }
            })
        }
        _ => {}
    }
    Ok(())
}

impl SnapshotDefinition {
    /// The record a `--redefine` import stores. `domain_config` is the
    /// domain's TOML to keep with it; `configured_disks` (the domain's
    /// disks now) stand in for a `<domain>` the XML lacks and fill in
    /// disks the XML does not mention (with the snapshot's default mode).
    pub fn into_redefined_meta(
        self,
        domain: &str,
        domain_config: &str,
        configured_disks: &[DomainDiskSource],
    ) -> Result<SnapshotMeta, SnapshotMetaError> {
        let name = self
            .name
            .clone()
            .ok_or_else(|| SnapshotMetaError::Xml("a redefined snapshot needs a <name>".into()))?;
        validate_snapshot_name(&name)?;
        let bad = |reason: String| SnapshotMetaError::Inconsistent {
            name: name.clone(),
            reason,
        };
        let state = self
            .state
            .ok_or_else(|| bad("a redefined snapshot needs a <state>".into()))?;
        let creation_time = self
            .creation_time
            .ok_or_else(|| bad("a redefined snapshot needs a <creationTime>".into()))?;
        let memory_mode = match &self.memory {
            Some(m) => m.mode,
            None if state.is_active() => DiskSnapshotMode::Internal,
            None => DiskSnapshotMode::No,
        };
        let any_external = memory_mode == DiskSnapshotMode::External
            || self
                .disks
                .iter()
                .any(|d| d.mode == Some(DiskSnapshotMode::External) || d.file.is_some());
        let default_mode = if any_external {
            DiskSnapshotMode::External
        } else {
            DiskSnapshotMode::Internal
        };
        let lookup = |key: &str| -> Option<&DomainDiskSource> {
            let by = |d: &&DomainDiskSource| d.target == key || d.file.as_os_str() == key;
            self.domain_disks
                .iter()
                .find(by)
                .or_else(|| configured_disks.iter().find(by))
        };
        let mut disks: Vec<DiskSnapshotRecord> = Vec::new();
        for req in &self.disks {
            let source = lookup(&req.target).ok_or_else(|| {
                bad(format!(
                    "disk {} is neither in the XML's <domain> nor in the domain's config",
                    req.target
                ))
            })?;
            let mode = req.mode.unwrap_or(if req.file.is_some() {
                DiskSnapshotMode::External
            } else {
                default_mode
            });
            let (overlay, overlay_format) = match mode {
                DiskSnapshotMode::External => {
                    let file = req.file.clone().ok_or_else(|| {
                        bad(format!(
                            "external disk {} needs <source file=> naming its overlay",
                            source.target
                        ))
                    })?;
                    (
                        Some(file),
                        Some(req.driver.clone().unwrap_or_else(|| "qcow2".into())),
                    )
                }
                _ => (None, None),
            };
            disks.push(DiskSnapshotRecord {
                target: source.target.clone(),
                mode,
                source: source.file.clone(),
                source_format: source.format.clone(),
                overlay,
                overlay_format,
            });
        }
        let known: Vec<&DomainDiskSource> = if self.domain_disks.is_empty() {
            configured_disks.iter().collect()
        } else {
            self.domain_disks.iter().collect()
        };
        for d in known {
            if !disks.iter().any(|r| r.target == d.target) {
                if default_mode == DiskSnapshotMode::External {
                    return Err(bad(format!(
                        "disk {} is not in <disks>; an external snapshot must name each disk's overlay or say snapshot='no'",
                        d.target
                    )));
                }
                disks.push(DiskSnapshotRecord {
                    target: d.target.clone(),
                    mode: default_mode,
                    source: d.file.clone(),
                    source_format: d.format.clone(),
                    overlay: None,
                    overlay_format: None,
                });
            }
        }
        let memory = match (memory_mode, &self.memory) {
            (DiskSnapshotMode::No, _) => MemorySnapshot::None,
            (DiskSnapshotMode::External, Some(MemoryRequest { file: Some(f), .. })) => {
                MemorySnapshot::External { path: f.clone() }
            }
            (DiskSnapshotMode::External, _) => {
                return Err(bad("external memory needs file=".into()))
            }
            (DiskSnapshotMode::Internal, _) => {
                let vmstate_disk = self
                    .vmstate_disk
                    .clone()
                    .or_else(|| {
                        disks
                            .iter()
                            .find(|d| d.mode == DiskSnapshotMode::Internal)
                            .map(|d| d.target.clone())
                    })
                    .ok_or_else(|| {
                        bad("internal memory needs an internally snapshotted disk".into())
                    })?;
                MemorySnapshot::Internal { vmstate_disk }
            }
        };
        let meta = SnapshotMeta {
            name,
            domain: domain.to_string(),
            description: self.description,
            parent: self.parent,
            creation_time,
            state,
            memory,
            disks,
            domain_config: domain_config.to_string(),
            is_current: false,
        };
        meta.validate()?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::meta::tests::{external_meta, internal_meta};
    use crate::snapshot::meta::SnapshotKind;

    fn configured() -> Vec<DomainDiskSource> {
        vec![DomainDiskSource {
            target: "vda".into(),
            file: "/img/vda.qcow2".into(),
            format: "qcow2".into(),
        }]
    }

    #[test]
    fn export_layout_is_libvirts() {
        let mut m = external_meta("s2", Some("s1"), 1_700_000_000);
        m.description = Some("a <b> & 'c'".into());
        let xml = snapshot_to_xml(&m);
        let expected = "<domainsnapshot>
  <name>s2</name>
  <description>a &lt;b&gt; &amp; &apos;c&apos;</description>
  <state>running</state>
  <parent>
    <name>s1</name>
  </parent>
  <creationTime>1700000000</creationTime>
  <memory snapshot='external' file='/state/test/s2.mem'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/state/test/vda.s2.qcow2'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <domain type='qemu'>
    <name>test</name>
    <os>
      <type>hvm</type>
    </os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='raw'/>
        <source file='/img/vda.raw'/>
        <target dev='vda'/>
      </disk>
      <disk type='file' device='disk'>
        <driver name='qemu' type='raw'/>
        <source file='/img/scratch.raw'/>
        <target dev='vdb'/>
      </disk>
    </devices>
  </domain>
</domainsnapshot>
";
        assert_eq!(xml, expected);
    }

    #[test]
    fn domain_facts_come_from_the_config() {
        let mut m = internal_meta("s", None, 1);
        m.domain_config = "name = \"test\"\naccel = \"kvm\"\nmemory_mib = 512\nvcpus = 2\n\
                           uuid = \"6695eb01-f6a4-8304-79aa-97f2502e193f\"\n"
            .into();
        let xml = snapshot_to_xml(&m);
        assert!(
            xml.contains(
                "  <domain type='kvm'>\n    <name>test</name>\n    \
             <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>\n    \
             <memory unit='MiB'>512</memory>\n    <vcpu>2</vcpu>\n    <os>\n"
            ),
            "{xml}"
        );
        m.domain_config = "not toml at all [".into();
        assert!(snapshot_to_xml(&m)
            .contains("  <domain type='qemu'>\n    <name>test</name>\n    <os>\n"));
    }

    /// `snapshot-dumpxml` output of virsh 9.0 (test driver) after the
    /// fan-out script and `snapshot-delete test s3`.
    const LIBVIRT_DUMP: &str = "<domainsnapshot>
  <name>s6</name>
  <state>running</state>
  <parent>
    <name>s1</name>
  </parent>
  <creationTime>1795310675</creationTime>
  <memory snapshot='internal'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
  </disks>
  <domain type='test'>
    <name>test</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
    <memory unit='KiB'>8388608</memory>
    <currentMemory unit='KiB'>2097152</currentMemory>
    <vcpu placement='static'>2</vcpu>
    <os>
      <type arch='i686'>hvm</type>
      <boot dev='hd'/>
    </os>
    <clock offset='utc'/>
    <devices>
      <disk type='file' device='disk'>
        <source file='/guest/diskimage1'/>
        <target dev='vda' bus='virtio'/>
        <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
      </disk>
      <interface type='network'>
        <mac address='aa:bb:cc:dd:ee:ff'/>
        <source network='default'/>
        <target dev='testnet0'/>
      </interface>
    </devices>
  </domain>
</domainsnapshot>
";

    #[test]
    fn libvirt_output_imports() {
        let def = parse_snapshot_xml(LIBVIRT_DUMP).unwrap();
        assert_eq!(def.name.as_deref(), Some("s6"));
        assert_eq!(def.parent.as_deref(), Some("s1"));
        assert_eq!(def.creation_time, Some(1_795_310_675));
        assert_eq!(def.state, Some(SnapshotState::Running));
        // No driver type in the test driver's domain disk: not guessed.
        assert!(def.domain_disks.is_empty());
        let meta = def
            .clone()
            .into_redefined_meta("test", "name = \"test\"", &configured())
            .unwrap();
        assert_eq!(meta.kind(), SnapshotKind::Internal);
        assert_eq!(
            meta.memory,
            MemorySnapshot::Internal {
                vmstate_disk: "vda".into()
            }
        );
        assert_eq!(meta.disks[0].source, PathBuf::from("/img/vda.qcow2"));
        let err = def.into_redefined_meta("test", "", &[]).unwrap_err();
        assert!(err.to_string().contains("disk vda is neither"), "{err}");
    }

    fn round_trip(meta: &SnapshotMeta) -> SnapshotMeta {
        let def = parse_snapshot_xml(&snapshot_to_xml(meta)).unwrap();
        def.into_redefined_meta(&meta.domain, &meta.domain_config, &[])
            .unwrap()
    }

    #[test]
    fn every_kind_round_trips_through_xml() {
        let mut metas = vec![
            internal_meta("i", None, 10),
            external_meta("e", Some("i"), 20),
        ];
        let mut di = internal_meta("di", Some("e"), 30);
        di.memory = MemorySnapshot::None;
        di.state = SnapshotState::DiskSnapshot;
        let mut de = external_meta("de", Some("di"), 40);
        de.memory = MemorySnapshot::None;
        de.state = SnapshotState::Shutoff;
        de.description = Some("x & y".into());
        let mut two = internal_meta("two", None, 50);
        two.disks.push(DiskSnapshotRecord {
            target: "vdb".into(),
            ..two.disks[0].clone()
        });
        two.disks[1].source = "/img/vdb.qcow2".into();
        two.memory = MemorySnapshot::Internal {
            vmstate_disk: "vdb".into(),
        };
        metas.extend([di, de, two]);
        let kinds: Vec<SnapshotKind> = metas.iter().map(SnapshotMeta::kind).collect();
        assert_eq!(
            kinds,
            [
                SnapshotKind::Internal,
                SnapshotKind::External,
                SnapshotKind::DiskOnlyInternal,
                SnapshotKind::DiskOnlyExternal,
                SnapshotKind::Internal
            ]
        );
        for m in &metas {
            assert_eq!(&round_trip(m), m, "{}", m.name);
        }
    }

    #[test]
    fn parses_virsh_style_request() {
        // What `virsh snapshot-create-as --print-xml` writes.
        let def = parse_snapshot_xml(
            "<domainsnapshot>
  <name>s1</name>
  <description>first</description>
  <memory snapshot='external' file='/var/m.img'/>
  <disks>
    <disk name='vda' snapshot='external'>
      <driver type='qcow2'/>
      <source file='/var/vda.s1'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
</domainsnapshot>",
        )
        .unwrap();
        assert_eq!(def.name.as_deref(), Some("s1"));
        assert_eq!(def.description.as_deref(), Some("first"));
        assert_eq!(
            def.memory,
            Some(MemoryRequest {
                mode: DiskSnapshotMode::External,
                file: Some("/var/m.img".into())
            })
        );
        assert_eq!(
            def.disks,
            [
                DiskRequest {
                    target: "vda".into(),
                    mode: Some(DiskSnapshotMode::External),
                    file: Some("/var/vda.s1".into()),
                    driver: Some("qcow2".into()),
                },
                DiskRequest {
                    target: "vdb".into(),
                    mode: Some(DiskSnapshotMode::No),
                    file: None,
                    driver: None,
                },
            ]
        );
        assert_eq!(def.state, None);
        let empty = parse_snapshot_xml("<domainsnapshot/>").unwrap();
        assert_eq!(empty, SnapshotDefinition::default());
    }

    #[test]
    fn redefine_fills_sources_from_configured_disks() {
        let def = parse_snapshot_xml(
            "<domainsnapshot><name>old</name><state>shutoff</state>\
             <creationTime>5</creationTime><active>0</active>\
             <parent><name>root</name></parent></domainsnapshot>",
        )
        .unwrap();
        assert_eq!(def.active, Some(false));
        let meta = def
            .into_redefined_meta("test", "name = \"test\"", &configured())
            .unwrap();
        assert_eq!(meta.kind(), SnapshotKind::DiskOnlyInternal);
        assert_eq!(meta.parent.as_deref(), Some("root"));
        assert_eq!(meta.disks[0].source, PathBuf::from("/img/vda.qcow2"));
        assert_eq!(meta.disks[0].mode, DiskSnapshotMode::Internal);
    }

    #[test]
    fn bad_documents_say_what_and_where() {
        let cases = [
            ("<domain/>", "root element is <domain>"),
            ("<domainsnapshot><state>crashed</state></domainsnapshot>", "crashed"),
            ("<domainsnapshot>\n<creationTime>soon</creationTime></domainsnapshot>", "line 2"),
            ("<domainsnapshot><memory snapshot='external'/></domainsnapshot>", "needs file="),
            ("<domainsnapshot><memory snapshot='internal' file='/m'/></domainsnapshot>", "takes no file"),
            ("<domainsnapshot><memory file='rel/m'/></domainsnapshot>", "absolute"),
            ("<domainsnapshot><disks><disk name='vda' snapshot='manual'/></disks></domainsnapshot>", "manual"),
            ("<domainsnapshot><disks><disk name='vda' type='block'/></disks></domainsnapshot>", "only file disks"),
            ("<domainsnapshot><disks><disk snapshot='no'/></disks></domainsnapshot>", "needs a name"),
            ("<domainsnapshot><active>2</active></domainsnapshot>", "0 or 1"),
            ("<domainsnapshot><name>a</name>", "ends inside <domainsnapshot>"),
            ("", "no <domainsnapshot>"),
            ("<domainsnapshot><domain><devices><disk type='file' device='disk'><driver type='raw'/><source file='rel'/><target dev='vda'/></disk></devices></domain></domainsnapshot>", "must be an absolute path"),
        ];
        for (doc, needle) in cases {
            let err = parse_snapshot_xml(doc).unwrap_err();
            assert!(err.to_string().contains(needle), "{doc}: {err}");
        }
    }

    #[test]
    fn redefine_refuses_incomplete_records() {
        let need = |doc: &str, needle: &str| {
            let err = parse_snapshot_xml(doc)
                .unwrap()
                .into_redefined_meta("test", "", &configured())
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{doc}: {err}");
        };
        need("<domainsnapshot/>", "needs a <name>");
        need(
            "<domainsnapshot><name>a</name></domainsnapshot>",
            "needs a <state>",
        );
        need(
            "<domainsnapshot><name>a</name><state>running</state></domainsnapshot>",
            "needs a <creationTime>",
        );
        need(
            "<domainsnapshot><name>a/b</name><state>running</state><creationTime>1</creationTime></domainsnapshot>",
            "must not contain '/'",
        );
        need(
            "<domainsnapshot><name>a</name><state>disk-snapshot</state><creationTime>1</creationTime>\
             <disks><disk name='vdz'/></disks></domainsnapshot>",
            "disk vdz is neither",
        );
        need(
            "<domainsnapshot><name>a</name><state>disk-snapshot</state><creationTime>1</creationTime>\
             <disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>",
            "needs <source file=>",
        );
    }

    #[test]
    fn print_xml_is_virshs_request() {
        let xml = create_as_request_xml(
            Some("s1"),
            Some("a <b> & 'c'"),
            Some("file=/m/s1,,x.mem,snapshot=external"),
            &[
                "vda,snapshot=external,driver=qcow2,file=/o/vda.s1".into(),
                "vdb,snapshot=no".into(),
                "vdc,stype=block,file=/dev/sdz".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            xml,
            "<domainsnapshot>
  <name>s1</name>
  <description>a &lt;b&gt; &amp; &apos;c&apos;</description>
  <memory snapshot='external' file='/m/s1,x.mem'/>
  <disks>
    <disk name='vda' snapshot='external'>
      <driver type='qcow2'/>
      <source file='/o/vda.s1'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
    <disk name='vdc' type='block'>
      <source dev='/dev/sdz'/>
    </disk>
  </disks>
</domainsnapshot>
"
        );
        // Nothing given: virsh's bare document, which parses as the default request.
        let bare = create_as_request_xml(None, None, None, &[]).unwrap();
        assert_eq!(bare, "<domainsnapshot>\n</domainsnapshot>\n");
        assert_eq!(
            parse_snapshot_xml(&bare).unwrap(),
            SnapshotDefinition::default()
        );
        // A bare memspec item must be an absolute path; control characters go.
        assert_eq!(
            create_as_request_xml(Some("a\u{1}b"), None, Some("/m"), &[]).unwrap(),
            "<domainsnapshot>\n  <name>ab</name>\n  <memory file='/m'/>\n</domainsnapshot>\n"
        );
        for (memspec, disk, message) in [
            (Some("m.mem"), None, "unable to parse memspec: m.mem"),
            (
                Some("file=/a,file=/b"),
                None,
                "unable to parse memspec: file=/a,file=/b",
            ),
            (
                None,
                Some("vda,bogus=1"),
                "unable to parse diskspec: vda,bogus=1",
            ),
            (None, Some("vda,stype=net"), "Unknown storage type: 'net'"),
        ] {
            let disks: Vec<String> = disk.into_iter().map(String::from).collect();
            let err = create_as_request_xml(None, None, memspec, &disks).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }

    /// Exports of every kind must validate against libvirt's own schema
    /// (Debian package libvirt0 ships /usr/share/libvirt/schemas).
    #[test]
    fn exports_validate_against_libvirt_schema() {
        let schema = std::path::Path::new("/usr/share/libvirt/schemas/domainsnapshot.rng");
        if !schema.exists() {
            eprintln!(
                "skipping: {} is absent (install Debian's libvirt0 package to run this check)",
                schema.display()
            );
            return;
        }
        let mut di = internal_meta("di", Some("e"), 30);
        di.memory = MemorySnapshot::None;
        di.state = SnapshotState::DiskSnapshot;
        let mut de = external_meta("de", Some("di"), 40);
        de.memory = MemorySnapshot::None;
        de.state = SnapshotState::Shutoff;
        let mut odd = internal_meta("name with <&> 'quotes' é", None, 0);
        odd.description = Some("multi\nline \"text\"".into());
        odd.domain = "dom-1".into();
        odd.domain_config = "accel = \"kvm\"\nmemory_mib = 256\nhugepages = true\nvcpus = 2\n\
                             uuid = \"6695eb01-f6a4-8304-79aa-97f2502e193f\"\n"
            .into();
        odd.disks[0].source = "/img/with space & amp.qcow2".into();
        let metas = [
            internal_meta("i", None, 10),
            external_meta("e", Some("i"), 20),
            di,
            de,
            odd,
        ];
        let dir = tempfile::tempdir().unwrap();
        for (n, m) in metas.iter().enumerate() {
            let file = dir.path().join(format!("snap{n}.xml"));
            std::fs::write(&file, snapshot_to_xml(m)).unwrap();
            let out = std::process::Command::new("xmllint")
                .arg("--noout")
                .arg("--relaxng")
                .arg(schema)
                .arg(&file)
                .output()
                .expect("xmllint must be installed (Debian package libxml2-utils)");
            assert!(
                out.status.success(),
                "{} does not validate:\n{}\n{}",
                m.name,
                String::from_utf8_lossy(&out.stderr),
                snapshot_to_xml(m)
            );
        }
        assert!(
            snapshot_to_xml(&metas[4]).contains("<memoryBacking>\n      <hugepages/>"),
            "a hugepage domain's export names its memory backing"
        );
        // The schema check itself must be able to fail.
        let bad = dir.path().join("bad.xml");
        std::fs::write(
            &bad,
            "<domainsnapshot><state>sleeping</state></domainsnapshot>",
        )
        .unwrap();
        let out = std::process::Command::new("xmllint")
            .args(["--noout", "--relaxng"])
            .arg(schema)
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
}
