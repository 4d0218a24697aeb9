//! xl snapshot configs (the never-shipped "xl snapshot-create" plan), and
//! the content sniffing that lets `snapshot-create DOM FILE` take either an
//! xl config or libvirt XML:
//!
//! ```text
//! name = "s1"
//! description = 'before upgrade'
//! memory = "yes"            # or "no", or "/abs/path/for/memory"
//! disk = [ 'vdev=vda,target=null',                       # internal
//!          'vdev=vdb,format=qcow2,target=/abs/vdb.s1',   # external overlay
//!        ]
//! ```
//!
//! The syntax is xl.cfg's: `KEY = VALUE` statements ended by a newline or
//! `;`, strings in double quotes (C escapes) or single quotes (verbatim),
//! lists in `[]` that may span lines and end with a comma, `#` comments.

use std::path::PathBuf;

use super::error::SnapshotMetaError;
use super::meta::DiskSnapshotMode;
use super::name::validate_snapshot_name;
use super::xml::{parse_snapshot_xml, DiskRequest, MemoryRequest, SnapshotDefinition};

/// Which syntax a snapshot document was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotDocumentFormat {
    /// libvirt domainsnapshot XML.
    LibvirtXml,
    /// xl snapshot config.
    XlConfig,
}

/// Parses a `snapshot-create` file, telling XML (first non-blank
/// character `<`) from an xl config by content, never by file name.
pub fn parse_snapshot_document(
    text: &str,
) -> Result<(SnapshotDocumentFormat, SnapshotDefinition), SnapshotMetaError> {
    let body = text.trim_start_matches('\u{feff}');
    if body.trim_start().starts_with('<') {
        Ok((
            SnapshotDocumentFormat::LibvirtXml,
            parse_snapshot_xml(body)?,
        ))
    } else {
        Ok((
            SnapshotDocumentFormat::XlConfig,
            parse_xl_snapshot_config(body)?,
        ))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Number(String),
    List(Vec<(Value, usize)>),
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Number(_) => "a number",
            Value::List(_) => "a list",
        }
    }
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
}

impl Lexer<'_> {
    fn err(&self, key: Option<&str>, reason: impl Into<String>) -> SnapshotMetaError {
        SnapshotMetaError::XlConfig {
            line: self.line,
            key: key.map(str::to_string),
            reason: reason.into(),
        }
    }

    /// Skips blanks and comments; stops before a newline unless `newlines`.
    fn skip_space(&mut self, newlines: bool) {
        while let Some(&c) = self.chars.peek() {
            match c {
                '#' => {
                    while let Some(&c) = self.chars.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.chars.next();
                    }
                }
                '\n' if newlines => {
                    self.line += 1;
                    self.chars.next();
                }
                c if c.is_whitespace() && c != '\n' => {
                    self.chars.next();
                }
                _ => break,
            }
        }
    }

    fn identifier(&mut self) -> String {
        let mut id = String::new();
        while let Some(&c) = self.chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                id.push(c);
                self.chars.next();
            } else {
                break;
            }
        }
        id
    }

    fn value(&mut self, key: &str) -> Result<Value, SnapshotMetaError> {
        self.skip_space(false);
        match self.chars.peek().copied() {
            Some('"') => {
                self.chars.next();
                self.double_quoted(key).map(Value::Str)
            }
            Some('\'') => {
                self.chars.next();
                let mut s = String::new();
                loop {
                    match self.chars.next() {
                        Some('\'') => return Ok(Value::Str(s)),
                        Some('\n') | None => {
                            return Err(self.err(Some(key), "unterminated '...' string"))
                        }
                        Some(c) => s.push(c),
                    }
                }
            }
            Some('[') => {
                self.chars.next();
                let mut items = Vec::new();
                loop {
                    self.skip_space(true);
                    match self.chars.peek().copied() {
                        Some(']') => {
                            self.chars.next();
                            return Ok(Value::List(items));
                        }
                        None => return Err(self.err(Some(key), "unterminated list: missing ']'")),
                        _ => {}
                    }
                    let line = self.line;
                    let item = self.value(key)?;
                    if matches!(item, Value::List(_)) {
                        return Err(self.err(Some(key), "lists cannot be nested"));
                    }
                    items.push((item, line));
                    self.skip_space(true);
                    match self.chars.next() {
                        Some(',') => {}
                        Some(']') => return Ok(Value::List(items)),
                        Some(c) => {
                            return Err(self.err(
                                Some(key),
                                format!("expected ',' or ']' in list, found '{c}'"),
                            ))
                        }
                        None => return Err(self.err(Some(key), "unterminated list: missing ']'")),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == '-' => {
                let mut n = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                        n.push(c);
                        self.chars.next();
                    } else {
                        break;
                    }
                }
                Ok(Value::Number(n))
            }
            Some(c) => Err(self.err(
                Some(key),
                format!("expected a \"string\", 'string', number or [list], found '{c}'"),
            )),
            None => Err(self.err(Some(key), "missing value after '='")),
        }
    }

    fn double_quoted(&mut self, key: &str) -> Result<String, SnapshotMetaError> {
        let mut s = String::new();
        loop {
            match self.chars.next() {
                Some('"') => return Ok(s),
                Some('\\') => match self.chars.next() {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('\\') => s.push('\\'),
                    Some('"') => s.push('"'),
                    Some('\'') => s.push('\''),
                    Some(c) => {
                        return Err(self.err(Some(key), format!("unknown escape '\\{c}' in string")))
                    }
                    None => return Err(self.err(Some(key), "unterminated \"...\" string")),
                },
                Some('\n') | None => return Err(self.err(Some(key), "unterminated \"...\" string")),
                Some(c) => s.push(c),
            }
        }
    }
}

/// Parses an xl snapshot config into a definition; every error names the
/// line and the key it belongs to.
pub fn parse_xl_snapshot_config(text: &str) -> Result<SnapshotDefinition, SnapshotMetaError> {
    let mut lx = Lexer {
        chars: text.chars().peekable(),
        line: 1,
    };
    let mut def = SnapshotDefinition::default();
    let mut seen: Vec<String> = Vec::new();
    loop {
        lx.skip_space(true);
        while lx.chars.peek() == Some(&';') {
            lx.chars.next();
            lx.skip_space(true);
        }
        if lx.chars.peek().is_none() {
            break;
        }
        let line = lx.line;
        let key = lx.identifier();
        if key.is_empty() {
            let c = lx.chars.peek().copied().unwrap_or(' ');
            return Err(lx.err(None, format!("expected KEY = VALUE, found '{c}'")));
        }
        lx.skip_space(false);
        if lx.chars.next() != Some('=') {
            return Err(lx.err(Some(&key), "expected '=' after the key"));
        }
        let value = lx.value(&key)?;
        lx.skip_space(false);
        match lx.chars.peek() {
            None | Some('\n') | Some(';') => {}
            Some(c) => {
                let c = *c;
                return Err(lx.err(Some(&key), format!("unexpected '{c}' after the value")));
            }
        }
        if seen.contains(&key) {
            return Err(SnapshotMetaError::XlConfig {
                line,
                key: Some(key),
                reason: "set twice; give each key once".into(),
            });
        }
        apply_key(&mut def, &key, value, line)?;
        seen.push(key);
    }
    Ok(def)
}

fn apply_key(
    def: &mut SnapshotDefinition,
    key: &str,
    value: Value,
    line: usize,
) -> Result<(), SnapshotMetaError> {
    let err = |line: usize, reason: String| SnapshotMetaError::XlConfig {
        line,
        key: Some(key.to_string()),
        reason,
    };
    let string = |value: Value| match value {
        Value::Str(s) => Ok(s),
        other => Err(err(
            line,
            format!("expected a string, found {}", other.describe()),
        )),
    };
    match key {
        "name" => {
            let name = string(value)?;
            validate_snapshot_name(&name).map_err(|e| err(line, e.to_string()))?;
            def.name = Some(name);
        }
        "description" => def.description = Some(string(value)?),
        "memory" => {
            let v = string(value)?;
            def.memory = match v.as_str() {
                "yes" => None,
                "no" => Some(MemoryRequest {
                    mode: DiskSnapshotMode::No,
                    file: None,
                }),
                path if path.starts_with('/') => Some(MemoryRequest {
                    mode: DiskSnapshotMode::External,
                    file: Some(PathBuf::from(path)),
                }),
                other => {
                    return Err(err(
                        line,
                        format!(
                        "'{other}' is not \"yes\", \"no\" or an absolute path for the memory file"
                    ),
                    ))
                }
            };
        }
        "disk" => {
            let Value::List(items) = value else {
                return Err(err(
                    line,
                    format!(
                        "expected a list like ['vdev=vda,target=null'], found {}",
                        value.describe()
                    ),
                ));
            };
            for (item, item_line) in items {
                let Value::Str(spec) = item else {
                    return Err(err(
                        item_line,
                        format!("disk entries are strings, found {}", item.describe()),
                    ));
                };
                let disk = parse_disk_entry(&spec).map_err(|reason| err(item_line, reason))?;
                if def.disks.iter().any(|d| d.target == disk.target) {
                    return Err(err(
                        item_line,
                        format!("disk {} is listed twice", disk.target),
                    ));
                }
                def.disks.push(disk);
            }
        }
        other => {
            return Err(err(
                line,
                format!("unknown key '{other}' (expected name, description, memory or disk)"),
            ))
        }
    }
    Ok(())
}

/// `vdev=vda,target=null` / `vdev=vdb,format=qcow2,target=/path`.
fn parse_disk_entry(spec: &str) -> Result<DiskRequest, String> {
    let mut vdev = None;
    let mut target: Option<&str> = None;
    let mut format = None;
    for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("disk entry '{spec}': '{item}' is not key=value"))?;
        let slot = match k.trim() {
            "vdev" => &mut vdev,
            "target" => &mut target,
            "format" => &mut format,
            other => {
                return Err(format!(
                    "disk entry '{spec}': unknown key '{other}' (expected vdev, target, format)"
                ))
            }
        };
        if slot.replace(v.trim()).is_some() {
            return Err(format!("disk entry '{spec}': '{}' given twice", k.trim()));
        }
    }
    let vdev = vdev
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("disk entry '{spec}' needs vdev= (the disk's target, e.g. vda)"))?;
    let (mode, file) = match target {
        None => (None, None),
        Some("null") => (Some(DiskSnapshotMode::Internal), None),
        Some(path) if path.starts_with('/') => {
            (Some(DiskSnapshotMode::External), Some(PathBuf::from(path)))
        }
        Some(other) => {
            return Err(format!(
                "disk entry '{spec}': target={other} must be null (internal) or an absolute overlay path"
            ))
        }
    };
    match (format, mode) {
        (Some(f), Some(DiskSnapshotMode::External)) if f != "qcow2" => {
            return Err(format!("disk entry '{spec}': overlays are qcow2, not {f}"))
        }
        (Some(_), Some(DiskSnapshotMode::Internal)) => {
            return Err(format!(
                "disk entry '{spec}': format= applies to an external overlay, not target=null"
            ))
        }
        _ => {}
    }
    Ok(DiskRequest {
        target: vdev.to_string(),
        mode,
        file,
        driver: format.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_example() {
        let text = "# snapshot before the upgrade\n\
                    name = \"s1\"\n\
                    description='before \"upgrade\"'   # trailing comment\n\
                    memory=\"yes\"\n\
                    disk=['vdev=vda,target=null', 'vdev=vdb,format=qcow2,target=/path']\n";
        let (format, def) = parse_snapshot_document(text).unwrap();
        assert_eq!(format, SnapshotDocumentFormat::XlConfig);
        assert_eq!(def.name.as_deref(), Some("s1"));
        assert_eq!(def.description.as_deref(), Some("before \"upgrade\""));
        assert_eq!(def.memory, None);
        assert_eq!(
            def.disks,
            [
                DiskRequest {
                    target: "vda".into(),
                    mode: Some(DiskSnapshotMode::Internal),
                    file: None,
                    driver: None
                },
                DiskRequest {
                    target: "vdb".into(),
                    mode: Some(DiskSnapshotMode::External),
                    file: Some("/path".into()),
                    driver: Some("qcow2".into())
                },
            ]
        );
    }

    #[test]
    fn multi_line_lists_semicolons_escapes_and_memory_forms() {
        let text = "name=\"a\\tb\"; memory = \"/var/mem.s\"\n\
                    disk = [\n  'vdev=vda, target=/o/vda',   # first\n\n  \"vdev=vdb,target=null\",\n]\n";
        let def = parse_xl_snapshot_config(text);
        // A tab is a control character: the name rule refuses it, naming line and key.
        let err = def.unwrap_err();
        assert_eq!(
            err.to_string(),
            "xl snapshot config line 1, key 'name': invalid snapshot name 'a\tb': a snapshot name must not contain control characters (newline, tab, ...)"
        );
        let def = parse_xl_snapshot_config(&text.replace("a\\tb", "a\\\"b")).unwrap();
        assert_eq!(def.name.as_deref(), Some("a\"b"));
        assert_eq!(
            def.memory,
            Some(MemoryRequest {
                mode: DiskSnapshotMode::External,
                file: Some("/var/mem.s".into())
            })
        );
        assert_eq!(def.disks.len(), 2);
        assert_eq!(def.disks[0].file, Some(PathBuf::from("/o/vda")));
        assert_eq!(def.disks[1].mode, Some(DiskSnapshotMode::Internal));
        let no = parse_xl_snapshot_config("memory='no'").unwrap();
        assert_eq!(no.memory.unwrap().mode, DiskSnapshotMode::No);
        assert_eq!(
            parse_xl_snapshot_config("  \n# only a comment\n").unwrap(),
            SnapshotDefinition::default()
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases = [
            (
                "name = \"s1\"\ncolour = \"red\"",
                "line 2, key 'colour': unknown key",
            ),
            ("name = s1", "line 1, key 'name': expected a \"string\""),
            (
                "name = 5",
                "line 1, key 'name': expected a string, found a number",
            ),
            ("name \"s1\"", "line 1, key 'name': expected '='"),
            (
                "description = \"open",
                "line 1, key 'description': unterminated",
            ),
            (
                "description = 'open\n'",
                "line 1, key 'description': unterminated",
            ),
            ("memory = \"maybe\"", "key 'memory': 'maybe' is not"),
            ("memory = \"rel/path\"", "absolute path"),
            ("disk = 'vdev=vda'", "key 'disk': expected a list"),
            ("disk = ['vdev=vda'\n", "key 'disk': unterminated list"),
            (
                "\n\ndisk = [\n 'vdev=vda,target=null',\n 'target=null',\n]",
                "line 5, key 'disk': disk entry 'target=null' needs vdev=",
            ),
            (
                "disk = ['vdev=vda,target=relative']",
                "must be null (internal) or an absolute",
            ),
            ("disk = ['vdev=vda,colour=red']", "unknown key 'colour'"),
            (
                "disk = ['vdev=vda,format=raw,target=/o']",
                "overlays are qcow2, not raw",
            ),
            (
                "disk = ['vdev=vda,format=qcow2,target=null']",
                "format= applies",
            ),
            ("disk = ['vdev=vda', 'vdev=vda']", "listed twice"),
            ("disk = ['vdev=vda,vdev=vdb']", "'vdev' given twice"),
            ("disk = [['vdev=vda']]", "cannot be nested"),
            ("disk = ['a' 'b']", "expected ',' or ']'"),
            (
                "name = \"a\"\nname = \"b\"",
                "line 2, key 'name': set twice",
            ),
            ("name = \"a\" extra", "unexpected 'e' after the value"),
            ("= \"a\"", "line 1: expected KEY = VALUE"),
            ("name = \"../x\"", "must not contain '/'"),
            ("name = \"\\q\"", "unknown escape"),
        ];
        for (text, needle) in cases {
            let err = parse_xl_snapshot_config(text).unwrap_err();
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
            assert_eq!(
                err.kind(),
                crate::snapshot::SnapshotMetaErrorKind::InvalidInput
            );
        }
    }

    #[test]
    fn xml_is_detected_by_content() {
        let (format, def) =
            parse_snapshot_document("\u{feff}\n  <domainsnapshot><name>x</name></domainsnapshot>")
                .unwrap();
        assert_eq!(format, SnapshotDocumentFormat::LibvirtXml);
        assert_eq!(def.name.as_deref(), Some("x"));
        let (format, _) = parse_snapshot_document("name='<x>'").unwrap();
        assert_eq!(format, SnapshotDocumentFormat::XlConfig);
        assert!(parse_snapshot_document("<notxml")
            .unwrap_err()
            .to_string()
            .starts_with("invalid domain snapshot XML"));
    }
}
