//! The snapshot commands accept what virsh's accept, so a virsh script runs
//! with `vmsnap` in virsh's place: the named forms of the positional
//! arguments (`--domain`, `--snapshotname`, `--name`, `--xmlfile`, ...)
//! placed as virsh places them, `snapshot-create` with or without a file,
//! virsh's error texts and the blank line after the XML; virsh's creation
//! options (`--print-xml`, `--halt`, `--reuse-external`, `--validate`, and
//! clear refusals of `--quiesce` and `--no-metadata`) and `snapshot-list
//! --metadata`/`--no-metadata`. On a stopped domain (offline snapshots)
//! wherever the behaviour does not need a running VM; `--halt` has one
//! test with the test guest.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::Guest;

const DOMAIN: &str = "off";

/// The vmsnap binary with a stopped domain `off` (one qcow2 disk) defined.
fn stopped_domain() -> VmsnapCli {
    let cli = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-virsh");
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

/// Every file under the state directory and the test directory.
fn files(cli: &VmsnapCli) -> Vec<PathBuf> {
    lab::files_under(cli.dir())
}

#[test]
fn print_xml_prints_virshs_request_and_creates_nothing() {
    let cli = stopped_domain();
    let before = files(&cli);
    let overlay = cli.path("vda.p1.qcow2");
    let diskspec = format!(
        "vda,snapshot=external,driver=qcow2,file={}",
        overlay.display()
    );

    // virsh's document, then the newline virsh adds to it and the command's.
    let printed = cli.ok(&[
        "snapshot-create-as",
        DOMAIN,
        "p1",
        "first <one>",
        "--memspec",
        "snapshot=no",
        "--diskspec",
        &diskspec,
        "--print-xml",
    ]);
    let document = format!(
        "<domainsnapshot>\n  <name>p1</name>\n  <description>first &lt;one&gt;</description>\n  \
         <memory snapshot='no'/>\n  <disks>\n    <disk name='vda' snapshot='external'>\n      \
         <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>\n  </disks>\n</domainsnapshot>\n",
        overlay.display()
    );
    assert_eq!(printed, format!("{document}\n\n"));
    // The named forms, positional diskspecs and virsh's bare document.
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            "--print-xml",
            "--domain",
            DOMAIN,
            "--name",
            "p1",
            "--description",
            "first <one>",
            "--memspec",
            "snapshot=no",
            &diskspec,
        ]),
        printed
    );
    assert_eq!(
        cli.ok(&["snapshot-create-as", DOMAIN, "--print-xml"]),
        "<domainsnapshot>\n</domainsnapshot>\n\n\n"
    );
    // Like today's virsh, it prints whatever creation flags come with it.
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            DOMAIN,
            "--print-xml",
            "--no-metadata",
            "--quiesce",
            "--halt"
        ]),
        "<domainsnapshot>\n</domainsnapshot>\n\n\n"
    );
    assert_eq!(files(&cli), before, "--print-xml made files");
    assert_eq!(names(&cli), "\n");

    // virsh's refusals: an unknown domain, specs virsh cannot parse.
    refused_mentioning(
        &cli,
        &["snapshot-create-as", "nosuch", "--print-xml"],
        "nosuch",
    );
    refused_with(
        &cli,
        &[
            "snapshot-create-as",
            DOMAIN,
            "--memspec",
            "m.mem",
            "--print-xml",
        ],
        "error: unable to parse memspec: m.mem",
    );
    refused_with(
        &cli,
        &[
            "snapshot-create-as",
            DOMAIN,
            "--diskspec",
            "vda,bogus=1",
            "--print-xml",
        ],
        "error: unable to parse diskspec: vda,bogus=1",
    );

    // What it printed is what snapshot-create takes: the same snapshot.
    let file = write(&cli, "p1.xml", &document);
    let file = file.to_str().unwrap();
    assert_eq!(
        cli.ok(&["snapshot-create", DOMAIN, file, "--validate"]),
        format!("Domain snapshot p1 created from '{file}'\n")
    );
    let xml = cli.ok(&["snapshot-dumpxml", DOMAIN, "p1"]);
    assert!(
        xml.contains("<description>first &lt;one&gt;</description>"),
        "{xml}"
    );
    assert!(
        xml.contains(&format!("<source file='{}'/>", overlay.display())),
        "{xml}"
    );
    let blk = cli.ok(&["domblklist", DOMAIN]);
    assert!(blk.contains(overlay.to_str().unwrap()), "{blk}");
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            DOMAIN,
            "p2",
            "--validate",
            "--atomic",
            "--live"
        ]),
        "Domain snapshot p2 created\n"
    );
    assert_eq!(names(&cli), "p1\np2\n\n");
    lab::assert_qemu_img_check_clean(&overlay, "after creating from printed XML");
}

#[test]
fn halt_leaves_a_stopped_domain_as_it_is() {
    let cli = stopped_domain();
    assert_eq!(
        cli.ok(&["snapshot-create-as", DOMAIN, "h1", "--halt"]),
        "Domain snapshot h1 created\n"
    );
    let file = write(
        &cli,
        "h2.xml",
        "<domainsnapshot><name>h2</name></domainsnapshot>\n",
    );
    let file = file.to_str().unwrap();
    assert_eq!(
        cli.ok(&["snapshot-create", DOMAIN, file, "--halt"]),
        format!("Domain snapshot h2 created from '{file}'\n")
    );
    let out = cli.ok(&["snapshot-create", DOMAIN, "--halt", "--disk-only"]);
    assert!(out.ends_with(" created\n"), "{out}");
    assert!(cli.ok(&["list", "--all"]).contains("shut off"));
    // A redefinition only records metadata: there is nothing to halt after.
    let saved = write(
        &cli,
        "h1.saved.xml",
        &cli.ok(&["snapshot-dumpxml", DOMAIN, "h1"]),
    );
    refused_with(
        &cli,
        &[
            "snapshot-create",
            DOMAIN,
            saved.to_str().unwrap(),
            "--redefine",
            "--halt",
        ],
        "error: Options --redefine and --halt are mutually exclusive",
    );
    assert_eq!(
        cli.ok(&["snapshot-revert", DOMAIN, "h1"]),
        "Domain snapshot h1 reverted\n\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--name"]).lines().count(),
        4
    );
}

#[test]
fn halt_stops_a_running_guest_and_its_snapshot_reverts() {
    let cli = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-virsh-halt");
    cli.guard("g");
    lab::create_qcow2(&cli.path("vda.qcow2"), "32M");
    let config = cli.write_guest_config("g", 160, &[DiskDef::qcow2("vda", "vda.qcow2")]);
    cli.ok(&["define", config.to_str().unwrap()]);
    // An overlay for --reuse-external, made before QEMU holds the image.
    let overlay = cli.path("vda.r0.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda.qcow2",
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
        "32M",
    ]);
    cli.ok(&["start", "g"]);
    let ctl = cli.control_socket();
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    // The running guest switches to the reused overlay too.
    let diskspec = format!("vda,file={}", overlay.display());
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            "g",
            "r0",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &diskspec
        ]),
        "Domain snapshot r0 created\n"
    );
    assert!(cli
        .ok(&["domblklist", "g"])
        .contains(overlay.to_str().unwrap()));
    guest.set_ram_value("before halt").unwrap();
    drop(guest);

    // The snapshot is taken with the guest running, then its QEMU ends.
    assert_eq!(
        cli.ok(&["snapshot-create-as", "g", "h1", "--halt"]),
        "Domain snapshot h1 created\n"
    );
    let list = cli.ok(&["list", "--all"]);
    assert!(
        list.contains("shut off") && !list.contains("running"),
        "{list}"
    );
    assert!(cli
        .ok(&["snapshot-info", "g", "h1"])
        .contains("State:          running\n"));

    // It reverts to the running guest it captured.
    assert_eq!(
        cli.ok(&["snapshot-revert", "g", "h1"]),
        "Domain snapshot h1 reverted\n\n"
    );
    assert!(cli.ok(&["list"]).contains("running"));
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "before halt");

    // snapshot-create --halt, from a document.
    guest.set_ram_value("second").unwrap();
    drop(guest);
    let file = cli.path("h2.xml");
    fs::write(&file, "<domainsnapshot><name>h2</name></domainsnapshot>\n").unwrap();
    cli.ok(&["snapshot-create", "g", file.to_str().unwrap(), "--halt"]);
    assert!(!cli.ok(&["list", "--all"]).contains("running"));
    cli.ok(&["snapshot-revert", "g", "h2"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "second");
    drop(guest);
    cli.ok(&["destroy", "g"]);
    lab::assert_qemu_img_check_clean(&overlay, "after --halt");
    lab::assert_qemu_img_check_clean(&cli.path("vda.qcow2"), "after --halt");
}

#[test]
fn quiesce_and_no_metadata_are_refused_with_what_to_do_instead() {
    let cli = stopped_domain();
    let file = write(
        &cli,
        "q.xml",
        "<domainsnapshot><name>q</name></domainsnapshot>\n",
    );
    let file = file.to_str().unwrap();
    let before = files(&cli);
    for args in [
        vec!["snapshot-create-as", DOMAIN, "q", "--quiesce"],
        vec![
            "snapshot-create-as",
            DOMAIN,
            "q",
            "--disk-only",
            "--quiesce",
        ],
        vec!["snapshot-create", DOMAIN, file, "--quiesce"],
        vec!["snapshot-create", DOMAIN, "--quiesce", "--disk-only"],
    ] {
        refused_mentioning(&cli, &args, "--quiesce is not supported");
        refused_mentioning(&cli, &args, "fsfreeze");
    }
    for args in [
        vec!["snapshot-create-as", DOMAIN, "q", "--no-metadata"],
        vec!["snapshot-create", DOMAIN, file, "--no-metadata"],
        vec!["snapshot-create", DOMAIN, "--no-metadata"],
    ] {
        refused_mentioning(&cli, &args, "--no-metadata is not supported");
        refused_mentioning(&cli, &args, "snapshot-delete DOMAIN NAME --metadata");
    }
    assert_eq!(names(&cli), "\n");
    assert_eq!(files(&cli), before, "a refusal left files behind");
    assert!(
        lab::qemu_img(&["snapshot", "-l", cli.path("vda.qcow2").to_str().unwrap()])
            .trim()
            .is_empty()
    );
}

#[test]
fn reuse_external_takes_an_empty_overlay_of_the_active_image() {
    let cli = stopped_domain();
    cli.ok(&["snapshot-create-as", DOMAIN, "base"]);
    // Made by the caller with a relative backing name, as libvirt allows.
    let overlay = cli.path("vda.r1.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda.qcow2",
        "-F",
        "qcow2",
        overlay.to_str().unwrap(),
        "16M",
    ]);
    let made = fs::read(&overlay).unwrap();
    let spec = |file: &std::path::Path| format!("vda,snapshot=external,file={}", file.display());

    // Without --reuse-external an existing file is never touched.
    refused_mentioning(
        &cli,
        &[
            "snapshot-create-as",
            DOMAIN,
            "r1",
            "--disk-only",
            "--diskspec",
            &spec(&overlay),
        ],
        "already exists",
    );
    // Files that are not an empty overlay of the active image are refused.
    let missing = cli.path("missing.qcow2");
    let stray = cli.path("stray.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        stray.to_str().unwrap(),
        "16M",
    ]);
    let small = cli.path("small.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda.qcow2",
        "-F",
        "qcow2",
        small.to_str().unwrap(),
        "8M",
    ]);
    let full = cli.path("full.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda.qcow2",
        "-F",
        "qcow2",
        full.to_str().unwrap(),
    ]);
    lab::qemu_io(&full, "write -P 0x5a 0 64k");
    let raw = cli.path("raw.img");
    fs::write(&raw, vec![0u8; 16 << 20]).unwrap();
    let before = files(&cli);
    for (file, needle) in [
        (&missing, "does not exist"),
        (&stray, "no backing file"),
        (&small, "bytes, the disk is"),
        (&full, "holds data"),
        (&raw, "not a usable qcow2 image"),
    ] {
        let line = cli.refused(&[
            "snapshot-create-as",
            DOMAIN,
            "r1",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &spec(file),
        ]);
        assert!(
            line.contains("--reuse-external") && line.contains(needle),
            "{line}"
        );
    }
    assert_eq!(files(&cli), before, "a refusal changed files");
    assert_eq!(names(&cli), "base\n\n");

    // The empty overlay is taken as it is: its header still names the
    // relative backing file vmsnap would have written as an absolute one.
    assert_eq!(
        cli.ok(&[
            "snapshot-create-as",
            DOMAIN,
            "r1",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &spec(&overlay),
        ]),
        "Domain snapshot r1 created\n"
    );
    assert_eq!(fs::read(&overlay).unwrap(), made);
    let blk = cli.ok(&["domblklist", DOMAIN]);
    assert!(blk.contains(overlay.to_str().unwrap()), "{blk}");
    assert!(cli
        .ok(&["snapshot-dumpxml", DOMAIN, "r1"])
        .contains("snapshot='external'"));
    // It is the active layer now: reusing it again is refused.
    refused_mentioning(
        &cli,
        &[
            "snapshot-create-as",
            DOMAIN,
            "r2",
            "--disk-only",
            "--reuse-external",
            "--diskspec",
            &spec(&overlay),
        ],
        "already uses it",
    );

    // snapshot-create takes --reuse-external for the overlays its document names.
    let second = cli.path("vda.r2.qcow2");
    lab::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        overlay.to_str().unwrap(),
        "-F",
        "qcow2",
        second.to_str().unwrap(),
        "16M",
    ]);
    let xml = write(
        &cli,
        "r2.xml",
        &format!(
            "<domainsnapshot><name>r2</name><memory snapshot='no'/><disks>\
             <disk name='vda' snapshot='external'><source file='{}'/></disk>\
             </disks></domainsnapshot>\n",
            second.display()
        ),
    );
    cli.ok(&[
        "snapshot-create",
        DOMAIN,
        xml.to_str().unwrap(),
        "--reuse-external",
    ]);
    assert_eq!(names(&cli), "base\nr1\nr2\n\n");
    assert!(cli.ok(&["check", DOMAIN]).starts_with("No problems found"));

    // Both still revert.
    cli.ok(&["snapshot-revert", DOMAIN, "r1"]);
    cli.ok(&["snapshot-revert", DOMAIN, "base"]);
    cli.ok(&["snapshot-delete", DOMAIN, "base", "--children"]);
    lab::assert_qemu_img_check_clean(&cli.path("vda.qcow2"), "after --reuse-external");
}

#[test]
fn snapshot_list_metadata_filters() {
    let cli = stopped_domain();
    cli.ok(&["snapshot-create-as", DOMAIN, "s1"]);
    cli.ok(&["snapshot-create-as", DOMAIN, "s2"]);
    let all = cli.ok(&["snapshot-list", DOMAIN]);
    let tree = cli.ok(&["snapshot-list", DOMAIN, "--tree"]);

    // Every vmsnap snapshot has metadata.
    assert_eq!(cli.ok(&["snapshot-list", DOMAIN, "--metadata"]), all);
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--metadata", "--tree"]),
        tree
    );
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--metadata", "--name"]),
        "s1\ns2\n\n"
    );
    // None lacks it: the empty listing in each form.
    let empty_table = " Name   Creation Time   State\n-------------------------------\n\n";
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--no-metadata"]),
        empty_table
    );
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--no-metadata", "--name"]),
        "\n"
    );
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--no-metadata", "--tree"]),
        "\n"
    );
    assert_eq!(
        cli.ok(&[
            "snapshot-list",
            DOMAIN,
            "--no-metadata",
            "--from",
            "s1",
            "--descendants"
        ]),
        empty_table
    );
    // With --tree virsh still draws the snapshot it starts from.
    assert_eq!(
        cli.ok(&[
            "snapshot-list",
            DOMAIN,
            "--no-metadata",
            "--tree",
            "--from",
            "s1"
        ]),
        cli.ok(&["snapshot-list", DOMAIN, "--tree", "--from", "s2"])
            .replace("s2", "s1")
    );
    // Both together are no filter, as libvirt takes them; neither is exclusive.
    assert_eq!(
        cli.ok(&["snapshot-list", DOMAIN, "--metadata", "--no-metadata"]),
        all
    );
    assert_eq!(
        cli.ok(&[
            "snapshot-list",
            DOMAIN,
            "--no-metadata",
            "--metadata",
            "--leaves",
            "--name"
        ]),
        "s2\n\n"
    );
}

#[test]
fn too_many_values_are_unexpected_data() {
    let cli = stopped_domain();
    cli.ok(&["snapshot-create-as", DOMAIN, "s1"]);
    let xml = write(
        &cli,
        "x.xml",
        "<domainsnapshot><name>x</name></domainsnapshot>\n",
    );
    let xml = xml.to_str().unwrap();
    for args in [
        vec!["snapshot-info", DOMAIN, "s1", "c"],
        vec!["snapshot-dumpxml", DOMAIN, "s1", "c"],
        vec!["snapshot-parent", DOMAIN, "s1", "c"],
        vec!["snapshot-current", DOMAIN, "s1", "c"],
        vec!["snapshot-revert", DOMAIN, "s1", "c"],
        vec!["snapshot-delete", DOMAIN, "s1", "c", "d"],
        vec!["snapshot-list", DOMAIN, "s1", "c"],
        vec!["snapshot-create", DOMAIN, xml, "c"],
        vec!["snapshot-recover", DOMAIN, "c"],
        vec!["--wait", "snapshot-info", "--current", DOMAIN, "s1", "c"],
    ] {
        refused_with(&cli, &args, "error: unexpected data 'c'");
    }
    assert_eq!(names(&cli), "s1\n\n");
}
