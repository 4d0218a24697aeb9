//! The snapshot commands accept what virsh's accept, so a virsh script runs
//! with `vmsnap` in virsh's place: the named forms of the positional
//! arguments (`--domain`, `--snapshotname`, `--name`, `--xmlfile`, ...)
//! placed as virsh places them, `snapshot-create` with or without a file,
//! virsh's error texts and the blank line after the XML. All on a stopped
//! domain (offline internal snapshots): none of it depends on a running VM.

use std::fs;
use std::path::PathBuf;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};

const DOMAIN: &str = "off";

/// The vmsnap binary with a stopped domain `off` (one qcow2 disk) defined.
fn stopped_domain() -> VmsnapCli {
    let dir = tempfile::Builder::new()
        .prefix("vmsnap-virsh")
        .tempdir()
        .unwrap();
    let cli = VmsnapCli::new(env!("CARGO_BIN_EXE_vmsnap"), dir);
    lab::create_qcow2(&cli.path("vda.qcow2"), "16M");
    let config = cli.path("off.toml");
    fs::write(
        &config,
        lab::stopped_domain_toml(DOMAIN, 128, &[DiskDef::qcow2("vda", "vda.qcow2")]),
    )
    .unwrap();
    cli.ok(&["define", config.to_str().unwrap()]);
    cli
}

/// A refusal with exactly `line` on stderr and exit status 1, as virsh.
fn refused_with(cli: &VmsnapCli, args: &[&str], line: &str) {
    let out = cli.run(args);
    let got = lab::refusal(args, &out);
    assert_eq!(got, line, "vmsnap {args:?}");
    assert_eq!(out.status.code(), Some(1), "vmsnap {args:?}");
}

/// A refusal whose one line contains `needle`.
fn refused_mentioning(cli: &VmsnapCli, args: &[&str], needle: &str) {
    let line = cli.refused(args);
    assert!(
        line.contains(needle),
        "vmsnap {args:?} should mention {needle:?}: {line}"
    );
}

fn names(cli: &VmsnapCli) -> String {
    cli.ok(&["snapshot-list", DOMAIN, "--name"])
}

fn write(cli: &VmsnapCli, file: &str, text: &str) -> PathBuf {
    let path = cli.path(file);
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn named_forms_of_the_positional_arguments() {
    let cli = stopped_domain();

    // snapshot-create-as: --domain, --name, --description, and virsh's
    // placement: a value after --domain is the next option, the name.
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            "--domain",
            DOMAIN,
            "--name",
            "s1",
            "--description",
            "first"
        ]),
        "Domain snapshot s1 created\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-create-as", "--domain", DOMAIN, "s2", "second"]),
        "Domain snapshot s2 created\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-create-as", DOMAIN, "--name", "s3", "third"]),
        "Domain snapshot s3 created\n"
    );
    assert_eq!(names(&cli), "s1\ns2\ns3\n\n");
    let info = cli.ok(&["snapshot-info", DOMAIN, "s3"]);
    assert!(info.contains("Parent:         s2\n"), "{info}");
    let xml = cli.ok(&["snapshot-dumpxml", DOMAIN, "s3"]);
    assert!(xml.contains("<description>third</description>"), "{xml}");

    // snapshot-list: --domain, and --from by position as virsh takes it.
    assert_eq!(
        cli.ok(&["snapshot-list", "--domain", DOMAIN, "--name"]),
        "s1\ns2\ns3\n\n"
    );
    assert_eq!(cli.ok(&["snapshot-list", DOMAIN, "s1", "--name"]), "s2\n\n");
    assert_eq!(
        cli.ok(&[
            "snapshot-list",
            "--domain",
            DOMAIN,
            "s1",
            "--descendants",
            "--name"
        ]),
        "s2\ns3\n\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-list", "--domain", DOMAIN, "--tree"]),
        cli.ok(&["snapshot-list", DOMAIN, "--tree"])
    );

    // The queries: every named form prints what the positional form does.
    for command in ["snapshot-info", "snapshot-dumpxml", "snapshot-parent"] {
        let positional = cli.ok(&[command, DOMAIN, "s2"]);
        for args in [
            vec![command, "--domain", DOMAIN, "--snapshotname", "s2"],
            vec![command, "--snapshotname", "s2", "--domain", DOMAIN],
            vec![command, DOMAIN, "--snapshotname", "s2"],
            vec![command, "--domain", DOMAIN, "s2"],
        ] {
            assert_eq!(cli.ok(&args), positional, "vmsnap {args:?}");
        }
    }
    assert_eq!(
        cli.ok(&[
            "snapshot-parent",
            "--domain",
            DOMAIN,
            "--snapshotname",
            "s2"
        ]),
        "s1\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-info", "--domain", DOMAIN, "--current"]),
        cli.ok(&["snapshot-info", DOMAIN, "s3"])
    );
    assert_eq!(
        cli.ok(&["snapshot-current", "--domain", DOMAIN, "--name"]),
        "s3\n"
    );
    assert_eq!(
        cli.ok(&[
            "snapshot-current",
            "--domain",
            DOMAIN,
            "--snapshotname",
            "s1"
        ]),
        "Snapshot s1 set as current\n"
    );
    assert_eq!(cli.ok(&["snapshot-current", DOMAIN, "--name"]), "s1\n");
    assert_eq!(
        cli.ok(&["snapshot-current", "--domain", DOMAIN, "s3"]),
        "Snapshot s3 set as current\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-dumpxml", DOMAIN, "s3", "--security-info"]),
        cli.ok(&["snapshot-current", DOMAIN, "--security-info"])
    );

    // The changes.
    assert_eq!(
        cli.ok(&[
            "snapshot-revert",
            "--domain",
            DOMAIN,
            "--snapshotname",
            "s1"
        ]),
        "Domain snapshot s1 reverted\n\n"
    );
    assert_eq!(cli.ok(&["snapshot-current", DOMAIN, "--name"]), "s1\n");
    assert_eq!(
        cli.ok(&["snapshot-revert", "--domain", DOMAIN, "s2"]),
        "Domain snapshot s2 reverted\n\n"
    );
    assert_eq!(
        cli.ok(&[
            "snapshot-delete",
            "--domain",
            DOMAIN,
            "--snapshotname",
            "s3"
        ]),
        "Domain snapshot s3 deleted\n\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-delete", "--domain", DOMAIN, "s2"]),
        "Domain snapshot s2 deleted\n\n"
    );
    assert_eq!(names(&cli), "s1\n\n");
    let file = write(
        &cli,
        "s4.xml",
        "<domainsnapshot><name>s4</name></domainsnapshot>\n",
    );
    let file = file.to_str().unwrap();
    assert_eq!(
        cli.ok(&["snapshot-create", "--domain", DOMAIN, "--xmlfile", file]),
        format!("Domain snapshot s4 created from '{file}'\n")
    );
    assert_eq!(
        cli.ok(&["snapshot-recover", "--domain", DOMAIN]),
        "Domain off needs no recovery\n\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-delete", "--domain", DOMAIN, "--current"]),
        "Domain snapshot s4 deleted\n\n"
    );
    assert_eq!(names(&cli), "s1\n\n");
    lab::assert_qemu_img_check_clean(&cli.path("vda.qcow2"), "after the named forms");
}

#[test]
fn both_forms_or_neither_are_refused_on_one_line() {
    let cli = stopped_domain();
    cli.ok(&["snapshot-create-as", DOMAIN, "s1"]);
    let xml = write(
        &cli,
        "x.xml",
        "<domainsnapshot><name>x1</name></domainsnapshot>\n",
    );
    let xml = xml.to_str().unwrap();

    // The domain twice, on every command.
    for args in [
        vec!["snapshot-create-as", DOMAIN, "--domain", DOMAIN],
        vec!["snapshot-create", DOMAIN, "--domain", DOMAIN],
        vec!["snapshot-list", DOMAIN, "--domain", DOMAIN],
        vec!["snapshot-info", DOMAIN, "s1", "--domain", DOMAIN],
        vec!["snapshot-dumpxml", DOMAIN, "s1", "--domain", DOMAIN],
        vec!["snapshot-parent", DOMAIN, "s1", "--domain", DOMAIN],
        vec!["snapshot-current", DOMAIN, "--domain", DOMAIN],
        vec!["snapshot-revert", DOMAIN, "s1", "--domain", DOMAIN],
        vec!["snapshot-delete", DOMAIN, "s1", "--domain", DOMAIN],
        vec!["snapshot-recover", DOMAIN, "--domain", DOMAIN],
    ] {
        refused_with(&cli, &args, "error: option --domain already seen");
    }
    // The second name, on every command that takes one.
    for command in [
        "snapshot-info",
        "snapshot-dumpxml",
        "snapshot-parent",
        "snapshot-current",
        "snapshot-revert",
        "snapshot-delete",
    ] {
        refused_with(
            &cli,
            &[command, DOMAIN, "s1", "--snapshotname", "s1"],
            "error: option --snapshotname already seen",
        );
    }
    refused_with(
        &cli,
        &["snapshot-create-as", DOMAIN, "s2", "--name", "s2"],
        "error: option --name already seen",
    );
    refused_with(
        &cli,
        &[
            "snapshot-create-as",
            DOMAIN,
            "s2",
            "d",
            "--description",
            "d",
        ],
        "error: option --description already seen",
    );
    refused_with(
        &cli,
        &["snapshot-create", DOMAIN, xml, "--xmlfile", xml],
        "error: option --xmlfile already seen",
    );
    refused_with(
        &cli,
        &["snapshot-list", DOMAIN, "s1", "--from", "s1"],
        "error: option --from already seen",
    );
    // With --domain named, the next value is the snapshot, and one more
    // has no option left.
    refused_with(
        &cli,
        &["snapshot-info", "--domain", DOMAIN, "s1", "s1"],
        "error: unexpected data 's1'",
    );

    // No domain at all, on every command.
    for command in [
        "snapshot-create-as",
        "snapshot-create",
        "snapshot-list",
        "snapshot-info",
        "snapshot-dumpxml",
        "snapshot-parent",
        "snapshot-current",
        "snapshot-revert",
        "snapshot-delete",
        "snapshot-recover",
    ] {
        refused_with(
            &cli,
            &[command],
            &format!("error: command '{command}' requires <domain> option"),
        );
    }
    // No snapshot where one is needed.
    refused_with(
        &cli,
        &["snapshot-dumpxml", "--domain", DOMAIN],
        "error: command 'snapshot-dumpxml' requires <snapshotname> option",
    );
    for command in [
        "snapshot-info",
        "snapshot-parent",
        "snapshot-revert",
        "snapshot-delete",
    ] {
        refused_with(
            &cli,
            &[command, "--domain", DOMAIN],
            "error: --snapshotname or --current is required",
        );
        refused_with(
            &cli,
            &[command, DOMAIN, "--snapshotname", "s1", "--current"],
            "error: --snapshotname and --current are mutually exclusive",
        );
    }
    refused_with(
        &cli,
        &["snapshot-current", DOMAIN, "--snapshotname", "s1", "--name"],
        "error: Options --name and --snapshotname are mutually exclusive",
    );

    // Nothing was created, deleted or moved.
    assert_eq!(names(&cli), "s1\n\n");
    assert_eq!(cli.ok(&["snapshot-current", DOMAIN, "--name"]), "s1\n");
}

#[test]
fn snapshot_create_with_and_without_a_file() {
    let cli = stopped_domain();

    // No file: virsh's `<domainsnapshot/>`, a default name (seconds).
    let out = cli.ok(&["snapshot-create", DOMAIN]);
    let name = out
        .strip_prefix("Domain snapshot ")
        .and_then(|rest| rest.strip_suffix(" created\n"))
        .unwrap_or_else(|| panic!("unexpected message {out:?}"));
    assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()),
        "default name {name:?}"
    );
    assert_eq!(names(&cli), format!("{name}\n\n"));

    // A positional file, named in the message exactly as given.
    let xml = write(
        &cli,
        "x1.xml",
        "<domainsnapshot>\n  <name>x1</name>\n  <description>from a file</description>\n</domainsnapshot>\n",
    );
    let xml = xml.to_str().unwrap();
    assert_eq!(
        cli.ok(&["snapshot-create", DOMAIN, xml]),
        format!("Domain snapshot x1 created from '{xml}'\n")
    );
    let info = cli.ok(&["snapshot-info", DOMAIN, "x1"]);
    assert!(
        info.contains(&format!("Parent:         {name}\n")),
        "{info}"
    );
    let dumped = cli.ok(&["snapshot-dumpxml", DOMAIN, "x1"]);
    assert!(
        dumped.contains("<description>from a file</description>"),
        "{dumped}"
    );

    // --xmlfile, and an xl snapshot config.
    let xl = write(&cli, "x2.cfg", "name=\"x2\"\n");
    let xl = xl.to_str().unwrap();
    assert_eq!(
        cli.ok(&["snapshot-create", "--xmlfile", xl, DOMAIN]),
        format!("Domain snapshot x2 created from '{xl}'\n")
    );

    // --redefine from a dumpxml (blank line and all) says where it came from.
    let saved = write(
        &cli,
        "x2.saved.xml",
        &cli.ok(&["snapshot-dumpxml", DOMAIN, "x2"]),
    );
    let saved = saved.to_str().unwrap();
    cli.ok(&["snapshot-delete", DOMAIN, "x2", "--metadata"]);
    assert_eq!(
        cli.ok(&["snapshot-create", DOMAIN, saved, "--redefine", "--current"]),
        format!("Domain snapshot x2 created from '{saved}'\n")
    );
    assert_eq!(cli.ok(&["snapshot-current", DOMAIN, "--name"]), "x2\n");
    assert_eq!(names(&cli), format!("{name}\nx1\nx2\n\n"));

    // Refusals change nothing.
    refused_mentioning(
        &cli,
        &["snapshot-create", DOMAIN, "--redefine"],
        "--xmlfile",
    );
    refused_with(
        &cli,
        &["snapshot-create", DOMAIN, "--current"],
        "error: --current needs --redefine",
    );
    refused_mentioning(
        &cli,
        &["snapshot-create", DOMAIN, "/nonexistent/x.xml"],
        "/nonexistent/x.xml",
    );
    assert_eq!(names(&cli), format!("{name}\nx1\nx2\n\n"));
    lab::assert_qemu_img_check_clean(&cli.path("vda.qcow2"), "after snapshot-create");
}

#[test]
fn virsh_error_texts_and_xml_layout() {
    let cli = stopped_domain();

    // No snapshot yet: virsh's texts, one line, exit 1.
    refused_with(
        &cli,
        &["snapshot-current", DOMAIN],
        "error: domain 'off' has no current snapshot",
    );
    refused_with(
        &cli,
        &["snapshot-current", DOMAIN, "--name"],
        "error: domain 'off' has no current snapshot",
    );
    refused_with(
        &cli,
        &["snapshot-info", DOMAIN, "--current"],
        "error: Domain snapshot not found: the domain does not have a current snapshot",
    );
    refused_with(
        &cli,
        &["snapshot-list", DOMAIN, "--current"],
        "error: Domain snapshot not found: the domain does not have a current snapshot",
    );

    cli.ok(&["snapshot-create-as", DOMAIN, "root"]);
    cli.ok(&["snapshot-create-as", DOMAIN, "child"]);
    refused_with(
        &cli,
        &["snapshot-parent", DOMAIN, "root"],
        "error: snapshot 'root' has no parent",
    );
    refused_with(
        &cli,
        &[
            "snapshot-parent",
            "--domain",
            DOMAIN,
            "--snapshotname",
            "root",
        ],
        "error: snapshot 'root' has no parent",
    );
    assert_eq!(cli.ok(&["snapshot-parent", DOMAIN, "--current"]), "root\n");

    // The XML, then the blank line virsh prints after every command.
    let xml = cli.ok(&["snapshot-dumpxml", DOMAIN, "child"]);
    assert!(xml.starts_with("<domainsnapshot>\n"), "{xml}");
    assert!(xml.ends_with("</domainsnapshot>\n\n"), "{xml:?}");
    assert_eq!(xml.matches("</domainsnapshot>").count(), 1);
    assert_eq!(cli.ok(&["snapshot-current", DOMAIN]), xml);

    // After the last snapshot goes, none is current again.
    cli.ok(&["snapshot-delete", DOMAIN, "root", "--children"]);
    refused_with(
        &cli,
        &["snapshot-current", "--domain", DOMAIN],
        "error: domain 'off' has no current snapshot",
    );
}
