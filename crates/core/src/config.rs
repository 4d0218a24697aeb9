//! Domain configuration: the TOML file a user writes for `vmsnap define`.
//!
//! The accepted keys are exactly `name`, `memory_mib`, `hugepages`, `vcpus`,
//! `accel`, `kernel`, `initrd`, `cmdline`, `firmware`, `qemu_args` and `[[disk]]`
//! tables with `target`, `file` and `format`. Anything else is refused with the
//! key and its line, because a silently ignored typo (`memroy_mib`) would give
//! the user a VM different from the one they wrote down.
//!
//! Disk formats are declared, never probed: a raw image whose first bytes look
//! like a qcow2 header stays raw (probing it would let a guest that wrote such
//! bytes make QEMU open host files named in its "header").

use std::fmt;
use std::fs;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Error, Result};

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where a guest can run on it, else TCG: probed (see
    /// [`crate::kvm::guest_can_run`]), since some hosts have a `/dev/kvm` on
    /// which Linux guests hang.
    Auto,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's portable software emulator.
    Tcg,
}

impl Accel {
    /// The accelerator QEMU is actually started with.
    pub fn resolved(self) -> Accel {
        match self {
            Accel::Auto if crate::kvm::guest_can_run() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            other => other,
        }
    }

    /// The name QEMU's `-accel` option takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// An image format as declared by the user (never probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2 v2/v3: supports internal snapshots and backing files.
    Qcow2,
    /// A flat image; snapshots of it are external overlays.
    Raw,
}

impl DiskFormat {
    /// The name QEMU's block drivers (and the metadata store) use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DiskFormat {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            other => Err(format!(
                "unknown disk format '{other}' (expected qcow2 or raw)"
            )),
        }
    }
}

/// One `[[disk]]` table: a guest disk and the image it starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// Guest-visible name (`vda`, `vdb`, ...); also the QEMU device id.
    pub target: String,
    /// Absolute path of the image the disk was defined with.
    pub file: PathBuf,
    /// The declared format of `file`.
    pub format: DiskFormat,
}

/// A validated domain configuration with absolute paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainConfig {
    /// Domain name: the key of everything vmsnap stores about the VM.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Guest RAM comes from the host's pool of 2 MiB huge pages, allocated
    /// when QEMU starts (libvirt's `<hugepages/>` with immediate
    /// allocation). A background memory snapshot then walks and
    /// write-protects RAM in 2 MiB steps inside the guest's pause instead of
    /// 4 KiB ones: the pause of an external snapshot drops from about 8 ms to
    /// about 3 ms for 1 GiB here. Needs `memory_mib / 2` free pages
    /// (`vm.nr_hugepages`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hugepages: bool,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Accelerator as written (use [`Accel::resolved`] for what QEMU gets).
    pub accel: Accel,
    /// Kernel for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Firmware image passed as `-bios`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Extra arguments appended verbatim to QEMU's command line.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub qemu_args: Vec<String>,
    /// Guest disks in the order they were declared.
    #[serde(rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Spanned<String>,
    memory_mib: Spanned<u64>,
    hugepages: Option<Spanned<bool>>,
    vcpus: Spanned<u32>,
    accel: Accel,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    cmdline: Option<Spanned<String>>,
    firmware: Option<Spanned<String>>,
    #[serde(default)]
    qemu_args: Vec<String>,
    #[serde(default)]
    disk: Vec<Spanned<RawDisk>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    target: Spanned<String>,
    file: Spanned<String>,
    format: Spanned<DiskFormat>,
}

/// The first bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The longest domain name accepted; keeps socket paths under the unix limit.
pub const MAX_NAME_LEN: usize = 64;

impl DomainConfig {
    /// Reads, parses and fully validates a config file, resolving relative
    /// paths against the file's directory (so a config next to its images works
    /// from any working directory).
    pub fn from_file(path: &Path) -> Result<DomainConfig> {
        let text =
            fs::read_to_string(path).map_err(|e| Error::io("read domain config", path, e))?;
        let absolute = std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?;
        let base = absolute.parent().unwrap_or(Path::new("/")).to_path_buf();
        let config = Self::parse(&text, path, &base)?;
        Ok(config)
    }

    /// Parses and validates config text. `origin` only names the source in
    /// messages; relative paths are joined to `base_dir`. Files named by the
    /// config must exist and disk formats must match their declaration.
    pub fn parse(text: &str, origin: &Path, base_dir: &Path) -> Result<DomainConfig> {
        let parser = Parser {
            text,
            origin,
            check_files: true,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| parser.toml_error(&e))?;
        parser.build(raw, base_dir)
    }

    /// Parses a config kept in the metadata store ([`DomainConfig::to_toml`]):
    /// keys and values are validated, files are not looked at. A domain must
    /// stay loadable (listable, undefinable) after its images moved on, e.g.
    /// when snapshot deletion merged the defined image away.
    pub fn from_stored(text: &str, origin: &Path) -> Result<DomainConfig> {
        let parser = Parser {
            text,
            origin,
            check_files: false,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| parser.toml_error(&e))?;
        parser.build(raw, Path::new("/"))
    }

    /// Renders the config back to TOML with absolute paths: the form kept in
    /// the metadata store, which re-parses without depending on any directory.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# unserialisable config: {e}\n"))
    }

    /// The disk with this target, if the domain has one.
    pub fn disk(&self, target: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|d| d.target == target)
    }
}

/// Checks that `path` is usable as an image of the declared `format`:
/// a qcow2 declaration needs the qcow2 magic and no backing file in the header
/// (vmsnap never follows a backing file it did not set up itself); a raw
/// declaration accepts any content, including bytes that look like qcow2.
pub fn check_image(path: &Path, format: DiskFormat) -> std::result::Result<(), String> {
    let mut file =
        fs::File::open(path).map_err(|e| format!("{} cannot be opened: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        return Err(format!(
            "{} is a directory, not a disk image",
            path.display()
        ));
    }
    if format == DiskFormat::Raw {
        return Ok(());
    }
    let mut header = [0u8; 20];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => return Err(format!("{} cannot be read: {e}", path.display())),
        }
    }
    if filled < 4 || header[..4] != QCOW2_MAGIC {
        return Err(format!(
            "{} is declared qcow2 but has no qcow2 header; if it is a raw image, declare format = \"raw\"",
            path.display()
        ));
    }
    let backing_offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    if filled == header.len() && backing_offset != 0 {
        return Err(format!(
            "{} is a qcow2 overlay with a backing file in its header; vmsnap never follows a backing \
             file it did not set up: flatten it first (qemu-img convert -O qcow2 {} NEW.qcow2)",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

struct Parser<'a> {
    text: &'a str,
    origin: &'a Path,
    /// Whether named files must exist and disk formats match (not for stored configs).
    check_files: bool,
}

impl Parser<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(&self, span: Option<Range<usize>>, reason: String) -> Error {
        Error::InvalidConfig {
            file: self.origin.to_path_buf(),
            line: span.map(|s| self.line_of(s.start)),
            reason,
        }
    }

    /// The key assigned on the line where `offset` lies, if that line is a
    /// `key = value` line (used to name the key of a mistyped value).
    fn key_at(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let before = &self.text[line_start..offset];
        let (key, _) = before.split_once('=')?;
        let key = key.trim().trim_matches('"');
        (!key.is_empty()).then(|| key.to_string())
    }

    /// The line of the `[[disk]]` header of the table a span starts in, if the
    /// span is a disk table (used to say which table lacks a key).
    fn table_at(&self, offset: usize) -> Option<usize> {
        let offset = offset.min(self.text.len());
        if self.text[offset..].trim_start().starts_with("[[") {
            let header =
                offset + (self.text[offset..].len() - self.text[offset..].trim_start().len());
            return Some(self.line_of(header));
        }
        let head = self.text[..offset].trim_end();
        let last_line_start = head.rfind('\n').map(|i| i + 1).unwrap_or(0);
        head[last_line_start..]
            .trim()
            .starts_with("[[")
            .then(|| self.line_of(last_line_start))
    }

    fn toml_error(&self, err: &toml::de::Error) -> Error {
        let message = err.message().trim().to_string();
        let span = err.span();
        if let Some(rest) = message.strip_prefix("unknown field ") {
            let key = rest.split(',').next().unwrap_or(rest);
            let allowed = rest.split_once("expected ").map(|(_, a)| a).unwrap_or("");
            return self.error(
                span,
                format!("unknown key {key}; allowed keys are {allowed}"),
            );
        }
        if let Some(rest) = message.strip_prefix("missing field ") {
            return match span.as_ref().and_then(|s| self.table_at(s.start)) {
                Some(line) => Error::InvalidConfig {
                    file: self.origin.to_path_buf(),
                    line: Some(line),
                    reason: format!(
                        "missing key {rest} in the [[disk]] table starting at line {line}"
                    ),
                },
                None => Error::InvalidConfig {
                    file: self.origin.to_path_buf(),
                    line: None,
                    reason: format!("missing key {rest} at the top level"),
                },
            };
        }
        let key = span.as_ref().and_then(|s| self.key_at(s.start));
        let reason = match key {
            Some(key) => format!("key `{key}`: {message}"),
            None => message,
        };
        self.error(span, reason)
    }

    fn resolve_existing(&self, value: &Spanned<String>, key: &str, base: &Path) -> Result<PathBuf> {
        let raw = Path::new(value.get_ref());
        if value.get_ref().is_empty() {
            return Err(self.error(Some(value.span()), format!("key `{key}` is empty")));
        }
        let joined = if raw.is_absolute() {
            raw.to_path_buf()
        } else {
            base.join(raw)
        };
        if !self.check_files {
            return Ok(joined);
        }
        fs::canonicalize(&joined).map_err(|e| {
            self.error(
                Some(value.span()),
                format!("key `{key}`: {} cannot be used: {e}", joined.display()),
            )
        })
    }

    fn build(&self, raw: RawConfig, base: &Path) -> Result<DomainConfig> {
        let name = raw.name.get_ref().clone();
        if let Err(why) = check_name(&name) {
            return Err(self.error(Some(raw.name.span()), format!("key `name`: {why}")));
        }
        if *raw.memory_mib.get_ref() < 16 || *raw.memory_mib.get_ref() > 16 * 1024 * 1024 {
            return Err(self.error(
                Some(raw.memory_mib.span()),
                "key `memory_mib`: must be between 16 and 16777216 (MiB)".into(),
            ));
        }
        let hugepages = raw.hugepages.as_ref().is_some_and(|h| *h.get_ref());
        if hugepages && *raw.memory_mib.get_ref() % 2 != 0 {
            return Err(self.error(
                raw.hugepages.as_ref().map(|h| h.span()),
                "key `hugepages`: needs `memory_mib` to be a whole number of 2 MiB pages (an even number)".into(),
            ));
        }
        if *raw.vcpus.get_ref() == 0 || *raw.vcpus.get_ref() > 255 {
            return Err(self.error(
                Some(raw.vcpus.span()),
                "key `vcpus`: must be between 1 and 255".into(),
            ));
        }
        if raw.kernel.is_none() && raw.firmware.is_none() {
            return Err(self.error(
                None,
                "missing key `kernel` (direct kernel boot) or `firmware` (boot from disk): one is needed".into(),
            ));
        }
        if raw.kernel.is_none() {
            for (key, value) in [
                ("initrd", raw.initrd.as_ref()),
                ("cmdline", raw.cmdline.as_ref()),
            ] {
                if let Some(value) = value {
                    return Err(self.error(
                        Some(value.span()),
                        format!("key `{key}` needs `kernel` to be set"),
                    ));
                }
            }
        }
        let kernel = raw
            .kernel
            .as_ref()
            .map(|k| self.resolve_existing(k, "kernel", base))
            .transpose()?;
        let initrd = raw
            .initrd
            .as_ref()
            .map(|k| self.resolve_existing(k, "initrd", base))
            .transpose()?;
        let firmware = raw
            .firmware
            .as_ref()
            .map(|k| self.resolve_existing(k, "firmware", base))
            .transpose()?;

        let mut disks: Vec<DiskConfig> = Vec::with_capacity(raw.disk.len());
        for table in &raw.disk {
            let disk = table.get_ref();
            let target = disk.target.get_ref();
            if let Err(why) = check_target(target) {
                return Err(self.error(Some(disk.target.span()), format!("key `target`: {why}")));
            }
            if disks.iter().any(|d| &d.target == target) {
                return Err(self.error(
                    Some(disk.target.span()),
                    format!("key `target`: disk {target} is declared twice; every disk needs its own target"),
                ));
            }
            let file = self.resolve_existing(&disk.file, "file", base)?;
            let format = *disk.format.get_ref();
            if self.check_files {
                if let Err(why) = check_image(&file, format) {
                    return Err(
                        self.error(Some(disk.format.span()), format!("disk {target}: {why}"))
                    );
                }
            }
            disks.push(DiskConfig {
                target: target.clone(),
                file,
                format,
            });
        }
        Ok(DomainConfig {
            name,
            memory_mib: *raw.memory_mib.get_ref(),
            hugepages,
            vcpus: *raw.vcpus.get_ref(),
            accel: raw.accel,
            kernel,
            initrd,
            cmdline: raw.cmdline.map(|c| c.into_inner()),
            firmware,
            qemu_args: raw.qemu_args,
            disks,
        })
    }
}

/// Checks a domain name: it becomes a directory name and part of QEMU
/// arguments, so it must be a single, harmless path component.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+');
    if name.is_empty() {
        return Err("a domain name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("'{name}' is longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.')
        || name.starts_with('-')
        || name.contains("..")
        || !name.chars().all(allowed)
    {
        return Err(format!(
            "'{name}' is not a usable domain name: use letters, digits and . _ + -, \
             not starting with '.' or '-' and without '..'"
        ));
    }
    Ok(())
}

/// Checks a disk target (`vda` ... `vdzz`): it becomes the QEMU device id and
/// part of block node names, which have a strict character set.
pub fn check_target(target: &str) -> std::result::Result<(), String> {
    let suffix = target.strip_prefix("vd").unwrap_or("");
    if suffix.is_empty() || suffix.len() > 2 || !suffix.chars().all(|c| c.is_ascii_lowercase()) {
        return Err(format!(
            "'{target}' is not a disk target: use vda, vdb, ... (vd + one or two letters)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("vmlinuz"), b"kernel").unwrap();
            fs::write(dir.path().join("initrd.img"), b"initrd").unwrap();
            let mut qcow2 = vec![0u8; 512];
            qcow2[..4].copy_from_slice(&QCOW2_MAGIC);
            qcow2[7] = 3;
            fs::write(dir.path().join("disk.qcow2"), &qcow2).unwrap();
            fs::write(dir.path().join("data.raw"), vec![0u8; 4096]).unwrap();
            Fixture { dir }
        }

        fn parse(&self, text: &str) -> Result<DomainConfig> {
            let path = self.dir.path().join("dom.toml");
            fs::write(&path, text).unwrap();
            DomainConfig::from_file(&path)
        }

        fn reason(&self, text: &str) -> (Option<usize>, String) {
            match self.parse(text) {
                Err(Error::InvalidConfig { line, reason, .. }) => (line, reason),
                other => panic!("expected InvalidConfig, got {other:?}"),
            }
        }
    }

    const GOOD: &str = r#"name = "demo"
memory_mib = 256
vcpus = 2
accel = "tcg"
kernel = "vmlinuz"
initrd = "initrd.img"
cmdline = "console=ttyS0"
qemu_args = ["-chardev", "socket,id=ctl,path=/tmp/x.sock,server=on,wait=off"]

[[disk]]
target = "vda"
file = "disk.qcow2"
format = "qcow2"

[[disk]]
target = "vdb"
file = "data.raw"
format = "raw"
"#;

    #[test]
    fn good_config_resolves_relative_paths() {
        let fx = Fixture::new();
        let config = fx.parse(GOOD).unwrap();
        let dir = fs::canonicalize(fx.dir.path()).unwrap();
        assert_eq!(config.name, "demo");
        assert_eq!(config.memory_mib, 256);
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.accel, Accel::Tcg);
        assert_eq!(
            config.kernel.as_deref(),
            Some(dir.join("vmlinuz").as_path())
        );
        assert_eq!(
            config.initrd.as_deref(),
            Some(dir.join("initrd.img").as_path())
        );
        assert_eq!(config.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(config.qemu_args.len(), 2);
        assert_eq!(
            config.disks,
            vec![
                DiskConfig {
                    target: "vda".into(),
                    file: dir.join("disk.qcow2"),
                    format: DiskFormat::Qcow2
                },
                DiskConfig {
                    target: "vdb".into(),
                    file: dir.join("data.raw"),
                    format: DiskFormat::Raw
                },
            ]
        );
    }

    #[test]
    fn stored_form_round_trips() {
        let fx = Fixture::new();
        let config = fx.parse(GOOD).unwrap();
        let text = config.to_toml();
        let again =
            DomainConfig::parse(&text, Path::new("(store)"), Path::new("/nonexistent")).unwrap();
        assert_eq!(config, again);
        // A stored config stays loadable when its files are gone.
        drop(fx);
        let stored = DomainConfig::from_stored(&text, Path::new("(store)")).unwrap();
        assert_eq!(config, stored);
        assert!(DomainConfig::parse(&text, Path::new("(store)"), Path::new("/")).is_err());
    }

    #[test]
    fn hugepages_is_off_unless_asked_and_needs_whole_pages() {
        let fx = Fixture::new();
        let plain = fx.parse(GOOD).unwrap();
        assert!(!plain.hugepages);
        assert!(!plain.to_toml().contains("hugepages"));
        let text = GOOD.replace("memory_mib = 256\n", "memory_mib = 256\nhugepages = true\n");
        let config = fx.parse(&text).unwrap();
        assert!(config.hugepages);
        let stored = DomainConfig::from_stored(&config.to_toml(), Path::new("(store)")).unwrap();
        assert_eq!(stored, config);
        let (line, reason) = fx.reason(&text.replace("memory_mib = 256", "memory_mib = 257"));
        assert_eq!(line, Some(3));
        assert!(reason.contains("even number"), "{reason}");
        let (line, reason) = fx.reason(&text.replace("hugepages = true", "hugepages = \"yes\""));
        assert_eq!(line, Some(3));
        assert!(reason.contains("hugepages"), "{reason}");
    }

    #[test]
    fn missing_key_is_named() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("memory_mib = 256\n", ""));
        assert!(reason.contains("missing key `memory_mib`"), "{reason}");
        assert_eq!(line, None);
    }

    #[test]
    fn missing_key_in_disk_table_names_the_table() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("format = \"raw\"\n", ""));
        assert!(reason.contains("missing key `format`"), "{reason}");
        assert!(
            reason.contains("[[disk]] table starting at line 15"),
            "{reason}"
        );
        assert!(line.is_some());
    }

    #[test]
    fn unknown_key_gives_line() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("vcpus = 2", "vcpus = 2\nmemroy_mib = 5"));
        assert_eq!(line, Some(4));
        assert!(reason.contains("unknown key `memroy_mib`"), "{reason}");
        assert!(
            reason.contains("`memory_mib`"),
            "allowed keys listed: {reason}"
        );
    }

    #[test]
    fn unknown_key_in_disk_table_gives_line() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace(
            "file = \"data.raw\"",
            "file = \"data.raw\"\ncache = \"none\"",
        ));
        assert_eq!(line, Some(18));
        assert!(reason.contains("unknown key `cache`"), "{reason}");
    }

    #[test]
    fn mistyped_value_names_key_and_line() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("vcpus = 2", "vcpus = \"two\""));
        assert_eq!(line, Some(3));
        assert!(reason.contains("key `vcpus`"), "{reason}");
        let (line, reason) = fx.reason(&GOOD.replace("accel = \"tcg\"", "accel = \"fast\""));
        assert_eq!(line, Some(4));
        assert!(
            reason.contains("key `accel`") && reason.contains("fast"),
            "{reason}"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let fx = Fixture::new();
        for bad in ["../x", "a/b", ".hidden", "a..b", "", "-x", "sp ace"] {
            let (line, reason) =
                fx.reason(&GOOD.replace("name = \"demo\"", &format!("name = \"{bad}\"")));
            assert_eq!(line, Some(1), "{bad}: {reason}");
            assert!(reason.contains("key `name`"), "{reason}");
        }
    }

    #[test]
    fn duplicate_target_is_refused() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("target = \"vdb\"", "target = \"vda\""));
        assert_eq!(line, Some(16));
        assert!(reason.contains("declared twice"), "{reason}");
    }

    #[test]
    fn missing_disk_file_is_refused() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace("data.raw", "nope.raw"));
        assert_eq!(line, Some(17));
        assert!(reason.contains("nope.raw"), "{reason}");
    }

    #[test]
    fn qcow2_declared_raw_image_is_refused() {
        let fx = Fixture::new();
        let (line, reason) = fx.reason(&GOOD.replace(
            "file = \"data.raw\"\nformat = \"raw\"",
            "file = \"data.raw\"\nformat = \"qcow2\"",
        ));
        assert_eq!(line, Some(18));
        assert!(reason.contains("no qcow2 header"), "{reason}");
    }

    #[test]
    fn qcow2_looking_raw_image_stays_raw() {
        let fx = Fixture::new();
        let config = fx
            .parse(&GOOD.replace(
                "file = \"disk.qcow2\"\nformat = \"qcow2\"",
                "file = \"disk.qcow2\"\nformat = \"raw\"",
            ))
            .unwrap();
        assert_eq!(config.disks[0].format, DiskFormat::Raw);
    }

    #[test]
    fn qcow2_with_header_backing_file_is_refused() {
        let fx = Fixture::new();
        let mut overlay = vec![0u8; 512];
        overlay[..4].copy_from_slice(&QCOW2_MAGIC);
        overlay[7] = 3;
        overlay[15] = 200;
        overlay[19] = 4;
        fs::write(fx.dir.path().join("disk.qcow2"), &overlay).unwrap();
        let (_, reason) = fx.reason(GOOD);
        assert!(reason.contains("backing file"), "{reason}");
    }

    #[test]
    fn kernel_or_firmware_required() {
        let fx = Fixture::new();
        let text = GOOD.replace(
            "kernel = \"vmlinuz\"\ninitrd = \"initrd.img\"\ncmdline = \"console=ttyS0\"\n",
            "",
        );
        let (_, reason) = fx.reason(&text);
        assert!(
            reason.contains("`kernel`") && reason.contains("`firmware`"),
            "{reason}"
        );
        let config = fx
            .parse(&text.replace(
                "accel = \"tcg\"",
                "accel = \"auto\"\nfirmware = \"vmlinuz\"",
            ))
            .unwrap();
        assert!(config.firmware.is_some());
        let probed = if crate::kvm::guest_can_run() {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        assert_eq!(config.accel.resolved(), probed);
    }

    #[test]
    fn error_message_is_one_line_with_file_and_line() {
        let fx = Fixture::new();
        let err = fx
            .parse(&GOOD.replace("vcpus = 2", "vcpus = 2\nbogus = 1"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("dom.toml line 4"), "{text}");
    }
}
