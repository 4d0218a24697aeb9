//! virsh 9.0's text output for the snapshot commands, as pure functions so
//! the CLI only prints and scripts written against virsh keep parsing.
//!
//! Every `render_*` and `msg_*` function returns the command's whole
//! standard output, including the blank line virsh adds after each command
//! (`vshCommandRun` prints `"\n"` after every command unless `--quiet`).

use super::meta::SnapshotMeta;
use super::tree::{SnapshotTree, TreeEntry};

/// The newline virsh prints after every command.
const COMMAND_EPILOGUE: &str = "\n";

/// Which clock `snapshot-list` shows creation times in. virsh uses the
/// local time zone; tests pin an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeZone {
    /// The process's local zone (`TZ`, `/etc/localtime`), like virsh.
    Local,
    /// A fixed offset east of UTC, in seconds.
    Fixed(i32),
}

impl TimeZone {
    /// The offset from UTC at a given instant, in seconds east.
    pub fn offset_at(self, unix_secs: i64) -> i32 {
        match self {
            Self::Fixed(offset) => offset,
            Self::Local => local_offset(unix_secs),
        }
    }
}

fn local_offset(unix_secs: i64) -> i32 {
    let t = libc::time_t::try_from(unix_secs).unwrap_or(0);
    // SAFETY: localtime_r only writes the tm we own; a zeroed tm is a valid
    // initial value for this plain C struct.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        i32::try_from(tm.tm_gmtoff).unwrap_or(0)
    }
}

/// Formats a creation time like virsh (`%Y-%m-%d %H:%M:%S %z`), e.g.
/// `2026-11-22 01:02:03 +0000`.
pub fn format_creation_time(unix_secs: i64, zone: TimeZone) -> String {
    let offset = zone.offset_at(unix_secs);
    let local = unix_secs + i64::from(offset);
    let days = local.div_euclid(86_400);
    let secs_of_day = local.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} {sign}{:02}{:02}",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
        abs / 3600,
        abs % 3600 / 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's well-known algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Replaces control characters with `\xNN` as virsh's table does, so
/// column widths stay right; returns the text and its width in columns.
fn table_cell(text: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut width = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let backslash_x = c == '\\' && chars.peek() == Some(&'x');
        if c.is_ascii_control() || backslash_x {
            out.push_str(&format!("\\x{:02x}", c as u32));
            width += 4;
        } else if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
                width += 4;
            }
        } else {
            out.push(c);
            width += 1;
        }
    }
    (out, width)
}

/// virsh's `vshTable`: each cell after one space, columns padded to the
/// widest cell plus two, the last column unpadded, a dash line under the
/// header as wide as every column plus three.
fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let encode = |row: &[String]| row.iter().map(|c| table_cell(c)).collect::<Vec<_>>();
    let header: Vec<(String, usize)> = header.iter().map(|h| table_cell(h)).collect();
    let body: Vec<Vec<(String, usize)>> = rows.iter().map(|r| encode(r)).collect();
    let mut widths: Vec<usize> = header.iter().map(|(_, w)| *w).collect();
    for row in &body {
        for (i, (_, w)) in row.iter().enumerate() {
            widths[i] = widths[i].max(*w);
        }
    }
    let mut out = String::new();
    let print_row = |out: &mut String, row: &[(String, usize)]| {
        for (i, (text, w)) in row.iter().enumerate() {
            out.push(' ');
            out.push_str(text);
            if i + 1 < row.len() {
                out.push_str(&" ".repeat(widths[i] - w + 2));
            }
        }
        out.push('\n');
    };
    print_row(&mut out, &header);
    for w in &widths {
        out.push_str(&"-".repeat(w + 3));
    }
    out.push('\n');
    for row in &body {
        print_row(&mut out, row);
    }
    out
}

/// `snapshot-list` (without `--tree`/`--name`): the Name / Creation Time /
/// State table, with a Parent column for `--parent`.
pub fn render_list_table(snapshots: &[&SnapshotMeta], with_parent: bool, zone: TimeZone) -> String {
    let mut header = vec!["Name", "Creation Time", "State"];
    if with_parent {
        header.push("Parent");
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|m| {
            let mut row = vec![
                m.name.clone(),
                format_creation_time(m.creation_time, zone),
                m.state.as_str().to_string(),
            ];
            if with_parent {
                row.push(m.parent.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    render_table(&header, &rows) + COMMAND_EPILOGUE
}

/// `snapshot-list --name`: one name per line.
pub fn render_list_names(snapshots: &[&SnapshotMeta]) -> String {
    let mut out: String = snapshots.iter().map(|m| format!("{}\n", m.name)).collect();
    out.push_str(COMMAND_EPILOGUE);
    out
}

/// `snapshot-list --tree`: virsh's drawing (`vshTreePrint`) of every
/// entry whose parent is `None`, children in the given (name) order.
/// Lines that end a branch carry virsh's trailing spaces.
pub fn render_tree(entries: &[TreeEntry]) -> String {
    let mut out = String::new();
    for (i, e) in entries.iter().enumerate() {
        if e.parent.is_none() {
            let mut indent = String::new();
            draw_node(entries, i, i, true, &mut indent, &mut out);
        }
    }
    out.push_str(COMMAND_EPILOGUE);
    out
}

fn draw_node(
    entries: &[TreeEntry],
    index: usize,
    last_sibling: usize,
    root: bool,
    indent: &mut String,
    out: &mut String,
) {
    let name = &entries[index].name;
    out.push_str(indent);
    if !root {
        out.push_str("+- ");
    }
    out.push_str(name);
    out.push('\n');
    if !root {
        indent.push(if index == last_sibling { ' ' } else { '|' });
        indent.push(' ');
    }
    let children: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.parent.as_deref() == Some(name.as_str()))
        .map(|(i, _)| i)
        .collect();
    let last_child = children.last().copied();
    if last_child.is_some() {
        out.push_str(indent);
        out.push_str("  |\n");
    }
    indent.push_str("  ");
    for &child in &children {
        draw_node(
            entries,
            child,
            last_child.unwrap_or(child),
            false,
            indent,
            out,
        );
    }
    indent.truncate(indent.len() - 2);
    if last_child.is_none() && index == last_sibling {
        out.push_str(indent);
        out.push('\n');
    }
    if !root {
        indent.truncate(indent.len() - 2);
    }
}

/// `snapshot-info`: virsh's `%-15s %s` field list.
pub fn render_info(tree: &SnapshotTree, meta: &SnapshotMeta) -> String {
    let children = tree.children(&meta.name).map(|c| c.len()).unwrap_or(0);
    let descendants = tree.descendants(&meta.name).map(|d| d.len()).unwrap_or(0);
    let fields: [(&str, String); 9] = [
        ("Name:", meta.name.clone()),
        ("Domain:", meta.domain.clone()),
        ("Current:", yes_no(meta.is_current).into()),
        ("State:", meta.state.as_str().into()),
        (
            "Location:",
            if meta.is_external() {
                "external"
            } else {
                "internal"
            }
            .into(),
        ),
        ("Parent:", meta.parent.clone().unwrap_or_else(|| "-".into())),
        ("Children:", children.to_string()),
        ("Descendants:", descendants.to_string()),
        ("Metadata:", "yes".into()),
    ];
    let mut out: String = fields
        .iter()
        .map(|(label, value)| format!("{label:<15} {value}\n"))
        .collect();
    out.push_str(COMMAND_EPILOGUE);
    out
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `snapshot-create-as` / `snapshot-create` success line.
pub fn msg_created(name: &str) -> String {
    format!("Domain snapshot {name} created{COMMAND_EPILOGUE}")
}

/// `snapshot-create DOM FILE` success line, naming the file as virsh does.
pub fn msg_created_from(name: &str, file: &str) -> String {
    format!("Domain snapshot {name} created from '{file}'{COMMAND_EPILOGUE}")
}

/// `snapshot-delete` success line.
pub fn msg_deleted(name: &str) -> String {
    format!("Domain snapshot {name} deleted\n{COMMAND_EPILOGUE}")
}

/// `snapshot-delete --children-only` success line.
pub fn msg_children_deleted(name: &str) -> String {
    format!("Domain snapshot {name} children deleted\n{COMMAND_EPILOGUE}")
}

/// `snapshot-revert` success line.
pub fn msg_reverted(name: &str) -> String {
    format!("Domain snapshot {name} reverted\n{COMMAND_EPILOGUE}")
}

/// `snapshot-current DOM NAME` success line.
pub fn msg_set_current(name: &str) -> String {
    format!("Snapshot {name} set as current{COMMAND_EPILOGUE}")
}

/// `snapshot-current --name` and `snapshot-parent`: the bare name.
pub fn render_name(name: &str) -> String {
    format!("{name}{COMMAND_EPILOGUE}")
}

/// `snapshot-dumpxml` and `snapshot-current` without `--name`: virsh
/// prints the document as it is (`vshPrint("%s", xml)`, libvirt's XML ends
/// in a newline), then the command's blank line, which scripts that
/// compare or split the output count on.
pub fn render_xml(xml: &str) -> String {
    format!("{xml}{COMMAND_EPILOGUE}")
}

/// `snapshot-create-as --print-xml`: virsh prints the document it built
/// with one more newline (`vshPrint("%s\n")`), then the command's.
pub fn render_request_xml(xml: &str) -> String {
    format!("{xml}\n{COMMAND_EPILOGUE}")
}

/// How virsh prints an error on stderr: `error: ` and the message.
pub fn render_error(message: &str) -> String {
    format!("error: {message}\n")
}

/// The two stderr lines virsh prints when a delete fails.
pub fn render_delete_failure(name: &str, reason: &str) -> String {
    format!("error: Failed to delete snapshot {name}\nerror: {reason}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::meta::tests::{external_meta, internal_meta};
    use crate::snapshot::meta::{MemorySnapshot, SnapshotState};
    use crate::snapshot::tree::tests::fan_out;
    use crate::snapshot::tree::{DeleteScope, ListQuery};
    use crate::snapshot::SnapshotMeta;

    #[test]
    fn creation_time_format() {
        assert_eq!(
            format_creation_time(0, TimeZone::Fixed(0)),
            "1970-01-01 00:00:00 +0000"
        );
        // 2026-11-22 01:02:03 UTC
        assert_eq!(
            format_creation_time(1_795_309_323, TimeZone::Fixed(0)),
            "2026-11-22 01:02:03 +0000"
        );
        assert_eq!(
            format_creation_time(1_795_309_323, TimeZone::Fixed(-(5 * 3600 + 30 * 60))),
            "2026-11-21 19:32:03 -0530"
        );
        assert_eq!(
            format_creation_time(951_782_400, TimeZone::Fixed(3600)),
            "2000-02-29 01:00:00 +0100"
        );
        assert_eq!(
            format_creation_time(-1, TimeZone::Fixed(0)),
            "1969-12-31 23:59:59 +0000"
        );
    }

    /// virsh's own expectation (tests/virsh-snapshot), trailing spaces
    /// included: they are what vshTreePrint writes.
    #[test]
    fn fan_out_tree_matches_virsh() {
        let tree = fan_out();
        let drawing = render_tree(&tree.tree_entries(None).unwrap());
        let expected = "s1\n  |\n  +- s3\n  |   |\n  |   +- s2\n  |   +- s6\n  |       |\n  |       +- s4\n  |       +- s5\n  |         \n  +- s7\n      |\n      +- s8\n        \n\n";
        assert_eq!(drawing, expected);
        // The sed of virsh's test (strip trailing blanks) gives its text.
        let stripped: Vec<&str> = drawing.lines().map(str::trim_end).collect();
        assert_eq!(
            stripped.join("\n"),
            "s1\n  |\n  +- s3\n  |   |\n  |   +- s2\n  |   +- s6\n  |       |\n  |       +- s4\n  |       +- s5\n  |\n  +- s7\n      |\n      +- s8\n\n"
        );
    }

    #[test]
    fn brief_example_tree() {
        let entries: Vec<TreeEntry> = [
            ("s1", None),
            ("s2", Some("s1")),
            ("s3", Some("s1")),
            ("s4", Some("s3")),
        ]
        .iter()
        .map(|(n, p)| TreeEntry {
            name: n.to_string(),
            parent: p.map(str::to_string),
        })
        .collect();
        assert_eq!(
            render_tree(&entries),
            "s1\n  |\n  +- s2\n  +- s3\n      |\n      +- s4\n        \n\n"
        );
    }

    #[test]
    fn tree_of_lone_roots_and_from() {
        let entries = vec![
            TreeEntry {
                name: "a".into(),
                parent: None,
            },
            TreeEntry {
                name: "b".into(),
                parent: None,
            },
        ];
        assert_eq!(render_tree(&entries), "a\n\nb\n\n\n");
        let tree = fan_out();
        assert_eq!(
            render_tree(&tree.tree_entries(Some("s6")).unwrap()),
            "s6\n  |\n  +- s4\n  +- s5\n    \n\n"
        );
        assert_eq!(render_tree(&[]), "\n");
    }

    #[test]
    fn list_tables_match_virsh_layout() {
        let mut tree = fan_out();
        tree.set_current("s1").unwrap();
        let plan = tree.plan_delete("s1", DeleteScope::Node, false).unwrap();
        tree.apply_delete(&plan).unwrap();
        let roots = tree
            .list(&ListQuery {
                roots: true,
                ..Default::default()
            })
            .unwrap();
        let table = render_list_table(&roots, false, TimeZone::Fixed(0));
        assert_eq!(
            table,
            " Name   Creation Time               State\n\
             ---------------------------------------------\n \
             s3     1970-01-01 00:17:00 +0000   running\n \
             s7     1970-01-01 00:17:50 +0000   running\n\n"
        );
        let q = ListQuery {
            no_leaves: true,
            ..Default::default()
        };
        let inner = tree.list(&q).unwrap();
        let table = render_list_table(&inner, true, TimeZone::Fixed(0));
        assert_eq!(
            table,
            " Name   Creation Time               State     Parent\n\
             ------------------------------------------------------\n \
             s3     1970-01-01 00:17:00 +0000   running   \n \
             s6     1970-01-01 00:17:20 +0000   running   s3\n \
             s7     1970-01-01 00:17:50 +0000   running   \n\n"
        );
        assert_eq!(render_list_names(&inner), "s3\ns6\ns7\n\n");
        assert_eq!(
            render_list_table(&[], false, TimeZone::Fixed(0)),
            " Name   Creation Time   State\n-------------------------------\n\n"
        );
    }

    #[test]
    fn wide_names_widen_their_column() {
        let mut a = internal_meta("before-kernel-upgrade", None, 0);
        a.state = SnapshotState::Paused;
        let table = render_list_table(&[&a], false, TimeZone::Fixed(0));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            " Name                    Creation Time               State"
        );
        assert_eq!(lines[1].len(), (21 + 3) + (25 + 3) + (6 + 3));
        assert_eq!(
            lines[2],
            " before-kernel-upgrade   1970-01-01 00:00:00 +0000   paused"
        );
    }

    #[test]
    fn info_matches_virsh_layout() {
        let tree = fan_out();
        let s3 = tree.get("s3").unwrap();
        assert_eq!(
            render_info(&tree, s3),
            "Name:           s3\nDomain:         test\nCurrent:        no\nState:          running\n\
             Location:       internal\nParent:         s1\nChildren:       2\nDescendants:    4\n\
             Metadata:       yes\n\n"
        );
        let mut e = external_meta("e", None, 5);
        e.is_current = true;
        e.memory = MemorySnapshot::None;
        e.state = SnapshotState::DiskSnapshot;
        let t = SnapshotTree::new(vec![e]).unwrap();
        let info = render_info(&t, t.get("e").unwrap());
        assert!(info.contains("Current:        yes\n"));
        assert!(info.contains("State:          disk-snapshot\n"));
        assert!(info.contains("Location:       external\n"));
        assert!(info.contains("Parent:         -\n"));
    }

    #[test]
    fn messages_match_virsh() {
        assert_eq!(msg_created("s1"), "Domain snapshot s1 created\n");
        assert_eq!(
            msg_created_from("s3", "s3.xml"),
            "Domain snapshot s3 created from 's3.xml'\n"
        );
        assert_eq!(msg_deleted("s1"), "Domain snapshot s1 deleted\n\n");
        assert_eq!(
            msg_children_deleted("s6"),
            "Domain snapshot s6 children deleted\n\n"
        );
        assert_eq!(msg_set_current("s1"), "Snapshot s1 set as current\n");
        assert_eq!(msg_reverted("s3"), "Domain snapshot s3 reverted\n\n");
        assert_eq!(render_name("s8"), "s8\n");
        assert_eq!(
            render_xml("<domainsnapshot>\n</domainsnapshot>\n"),
            "<domainsnapshot>\n</domainsnapshot>\n\n"
        );
        assert_eq!(
            render_error("domain 'test' has no current snapshot"),
            "error: domain 'test' has no current snapshot\n"
        );
        assert_eq!(
            render_delete_failure("s1", "boom"),
            "error: Failed to delete snapshot s1\nerror: boom\n"
        );
    }

    /// The fan-out script run through virsh 9.0 (Debian 12's
    /// libvirt-clients, `--connect test:///default`, TZ=UTC), rebuilt from
    /// our functions. Every snapshot was taken in the same second there.
    #[test]
    fn transcript_matches_virsh_9_0() {
        const VIRSH: &str = "Domain snapshot s1 created
Domain snapshot s3 created
Domain snapshot s2 created
Domain snapshot s3 reverted

Domain snapshot s6 created
Domain snapshot s5 created
Domain snapshot s6 reverted

Domain snapshot s4 created
Domain snapshot s1 reverted

Domain snapshot s7 created
Domain snapshot s8 created
s1
  |
  +- s3
  |   |
  |   +- s2
  |   +- s6
  |       |
  |       +- s4
  |       +- s5
  |         \n  +- s7
      |
      +- s8
        \n
s1
s7
s8
s3
s6
s4
s5
s2

 Name   Creation Time               State     Parent
------------------------------------------------------
 s1     2026-11-22 01:24:35 +0000   running   \n s2     2026-11-22 01:24:35 +0000   running   s3
 s3     2026-11-22 01:24:35 +0000   running   s1
 s4     2026-11-22 01:24:35 +0000   running   s6
 s5     2026-11-22 01:24:35 +0000   running   s6
 s6     2026-11-22 01:24:35 +0000   running   s3
 s7     2026-11-22 01:24:35 +0000   running   s1
 s8     2026-11-22 01:24:35 +0000   running   s7

s6
s4
s5
s2

 Name   Creation Time   State
-------------------------------

Name:           s3
Domain:         test
Current:        no
State:          running
Location:       internal
Parent:         s1
Children:       2
Descendants:    4
Metadata:       yes

s6
  |
  +- s4
  +- s5
    \n
Domain snapshot s3 deleted

s1
  |
  +- s2
  +- s6
  |   |
  |   +- s4
  |   +- s5
  |     \n  +- s7
      |
      +- s8
        \n
";
        let mut out = String::new();
        let mut tree = SnapshotTree::default();
        let mut clock = 1_000;
        let mut create = |tree: &mut SnapshotTree, out: &mut String, name: &str| {
            clock += 10;
            let parent = tree.current().map(|m| m.name.clone());
            tree.insert_created(internal_meta(name, parent.as_deref(), clock))
                .unwrap();
            out.push_str(&msg_created(name));
        };
        let revert = |tree: &mut SnapshotTree, out: &mut String, name: &str| {
            tree.set_current(name).unwrap();
            out.push_str(&msg_reverted(name));
        };
        create(&mut tree, &mut out, "s1");
        create(&mut tree, &mut out, "s3");
        create(&mut tree, &mut out, "s2");
        revert(&mut tree, &mut out, "s3");
        create(&mut tree, &mut out, "s6");
        create(&mut tree, &mut out, "s5");
        revert(&mut tree, &mut out, "s6");
        create(&mut tree, &mut out, "s4");
        revert(&mut tree, &mut out, "s1");
        create(&mut tree, &mut out, "s7");
        create(&mut tree, &mut out, "s8");
        out.push_str(&render_tree(&tree.tree_entries(None).unwrap()));
        let topo = ListQuery {
            topological: true,
            ..Default::default()
        };
        out.push_str(&render_list_names(&tree.list(&topo).unwrap()));
        let same_second: Vec<SnapshotMeta> = tree
            .list(&ListQuery::default())
            .unwrap()
            .into_iter()
            .map(|m| SnapshotMeta {
                creation_time: 1_795_310_675,
                ..m.clone()
            })
            .collect();
        let rows: Vec<&SnapshotMeta> = same_second.iter().collect();
        out.push_str(&render_list_table(&rows, true, TimeZone::Fixed(0)));
        let from_s3 = ListQuery {
            from: Some("s3".into()),
            descendants: true,
            topological: true,
            ..Default::default()
        };
        out.push_str(&render_list_names(&tree.list(&from_s3).unwrap()));
        let leaf_roots = ListQuery {
            leaves: true,
            roots: true,
            ..Default::default()
        };
        out.push_str(&render_list_table(
            &tree.list(&leaf_roots).unwrap(),
            false,
            TimeZone::Fixed(0),
        ));
        out.push_str(&render_info(&tree, tree.get("s3").unwrap()));
        out.push_str(&render_tree(&tree.tree_entries(Some("s6")).unwrap()));
        let plan = tree.plan_delete("s3", DeleteScope::Node, false).unwrap();
        tree.apply_delete(&plan).unwrap();
        out.push_str(&msg_deleted("s3"));
        out.push_str(&render_tree(&tree.tree_entries(None).unwrap()));
        assert_eq!(out, VIRSH);
    }

    #[test]
    fn control_characters_are_escaped_in_tables() {
        assert_eq!(table_cell("a\tb"), ("a\\x09b".into(), 6));
        assert_eq!(table_cell("é"), ("é".into(), 1));
    }
}
