//! Hostile input (DESIGN §5.6, issue 5 item 3), through the real `vmsnap`
//! binary: a backing file named inside an image is never opened; a raw disk
//! that looks like qcow2 stays raw; snapshot names and memspec/diskspec
//! paths cannot reach outside what the user named; the state directory and
//! everything in it are private to their owner.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Command;

use hardening::{host_checksum, non_private_entries, DiskDef, Lab};

/// The files `vmsnap args` opened (open/openat/openat2/creat/execve/stat
/// family), traced with strace across forks; the command must succeed or
/// fail as the caller expects, so its status is returned too.
fn traced(lab: &Lab, args: &[&str]) -> (std::process::Output, String) {
    let log = lab.path(&format!("strace.{}", args.join("_").replace('/', "_")));
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=%file", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_vmsnap"))
        .arg("--state-dir")
        .arg(lab.state())
        .args(args)
        .current_dir(lab.path(""))
        .output()
        .expect("strace is installed (apt-get install strace)");
    let trace = fs::read_to_string(&log).expect("strace log");
    (out, trace)
}

fn opened_lines<'a>(trace: &'a str, needle: &str) -> Vec<&'a str> {
    trace.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn backing_file_named_in_an_image_header_is_never_opened() {
    let lab = Lab::new("hostile-backing");
    // SECRET holds recognisable non-zero bytes: a guest reading them through
    // a followed backing file would see them instead of zeros.
    let secret = lab.path("SECRET");
    fs::write(&secret, vec![0xa5u8; 1 << 20]).unwrap();
    let secret_arg = secret.to_str().unwrap();
    lab.qemu_img_create(&[
        "-f",
        "qcow2",
        "-b",
        secret_arg,
        "-F",
        "raw",
        "evil.qcow2",
        "64M",
    ]);

    // `img info`, `img check` and `img snapshot -l` describe the image
    // without opening what its header names.
    for args in [
        vec!["img", "info", "evil.qcow2"],
        vec!["img", "check", "evil.qcow2"],
        vec!["img", "snapshot", "-l", "evil.qcow2"],
    ] {
        let (out, trace) = traced(&lab, &args);
        assert!(
            out.status.success(),
            "vmsnap {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            opened_lines(&trace, "SECRET"),
            Vec::<&str>::new(),
            "vmsnap {args:?} touched the backing file named in the header"
        );
    }

    // A domain whose disk is such an overlay is refused at define, clearly,
    // without opening SECRET, and nothing is defined.
    let config = lab.write_config(
        "evil",
        128,
        &[DiskDef {
            target: "vda",
            file: "evil.qcow2",
            format: "qcow2",
        }],
    );
    let args = ["define", config.to_str().unwrap()];
    let (out, trace) = traced(&lab, &args);
    let refused = hardening::refusal(&args, &out);
    assert!(
        refused.contains("evil.qcow2") && refused.contains("backing"),
        "the refusal names the image and the reason: {refused}"
    );
    assert_eq!(opened_lines(&trace, "SECRET"), Vec::<&str>::new());
    assert!(!lab.ok(&["list", "--all"]).contains("evil"));

    // Swap attack: define over a clean image, then replace it with the
    // overlay. Neither the stopped-domain snapshot path (our engine) nor
    // start may open SECRET; a start that goes ahead must give the guest
    // zeros, not SECRET's bytes.
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "swap",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    fs::copy(lab.path("evil.qcow2"), lab.path("vda.qcow2")).unwrap();
    for args in [
        vec!["snapshot-create-as", "swap", "offline1"],
        vec!["domblklist", "swap"],
    ] {
        let (_, trace) = traced(&lab, &args);
        assert_eq!(
            opened_lines(&trace, "SECRET"),
            Vec::<&str>::new(),
            "vmsnap {args:?} touched the backing file named in the header"
        );
    }
    let out = lab.run(&["start", "swap"]);
    if !out.status.success() {
        let refused = hardening::refusal(&["start", "swap"], &out);
        assert!(refused.contains("backing"), "{refused}");
        assert_eq!(lab.qemu_pid("swap"), None, "a refused start leaves no QEMU");
        return;
    }
    let pid = lab.qemu_pid("swap").expect("QEMU pid file");
    let mut guest = lab.connect("swap");
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !fds.iter().any(|f| f.contains("SECRET")),
        "QEMU holds SECRET open: {fds:?}"
    );
    // QEMU may report the header's backing file name, but no node of its
    // graph may be opened on SECRET.
    let nodes: serde_json::Value =
        serde_json::from_str(&lab.ok(&["qmp", "swap", "query-named-block-nodes"])).unwrap();
    for node in nodes.as_array().unwrap() {
        assert!(
            !node["file"].as_str().unwrap_or("").contains("SECRET")
                && node["backing_file_depth"] == 0,
            "QEMU opened a node on SECRET or a backing chain: {node}"
        );
    }
    let zeros = vmsnap_testguest::sha256_hex(&vec![0u8; 1 << 20]);
    assert_eq!(
        guest.disk_checksum("vda", 0, 1 << 20).unwrap(),
        zeros,
        "the guest must read zeros, not the backing file named in the header"
    );
}

#[test]
fn raw_disk_that_looks_like_qcow2_stays_raw_and_is_never_snapshotted_internally() {
    let lab = Lab::new("hostile-raw");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    // A qcow2 header claiming 1 GiB at offset 0 of a 16 MiB raw disk.
    lab.qemu_img_create(&["-f", "qcow2", "vdb.raw", "1G"]);
    let raw = lab.path("vdb.raw");
    fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let original = fs::read(&raw).unwrap();
    let header_sum = host_checksum(&raw, 0, 1 << 20);
    lab.define(
        "rawdom",
        &[
            DiskDef {
                target: "vda",
                file: "vda.qcow2",
                format: "qcow2",
            },
            DiskDef {
                target: "vdb",
                file: "vdb.raw",
                format: "raw",
            },
        ],
    );

    // Stopped domain: an internal snapshot (the default) cannot include the
    // raw disk; refusing must leave the raw bytes exactly as they were.
    let refused = lab.fails(&["snapshot-create-as", "rawdom", "int0"]);
    assert!(
        refused.contains("vdb"),
        "the refusal names the disk: {refused}"
    );
    lab.fails(&[
        "snapshot-create-as",
        "rawdom",
        "int1",
        "--disk-only",
        "--diskspec",
        "vda,snapshot=internal",
        "--diskspec",
        "vdb,snapshot=internal",
    ]);
    assert!(lab.snapshot_names("rawdom").is_empty());
    assert!(
        fs::read(&raw).unwrap() == original,
        "the raw disk's bytes changed"
    );

    // Running: the guest sees a 16 MiB disk whose first bytes are the qcow2 header.
    let mut guest = lab.start_guest("rawdom");
    let disks = guest.disks().unwrap();
    let vdb = disks
        .iter()
        .find(|d| d.name == "vdb")
        .expect("guest sees vdb");
    assert_eq!(vdb.size, 16 << 20, "raw size, not the header's 1 GiB");
    assert_eq!(guest.disk_checksum("vdb", 0, 1 << 20).unwrap(), header_sum);

    let refused = lab.fails(&["snapshot-create-as", "rawdom", "int2"]);
    assert!(refused.contains("vdb"), "{refused}");
    assert!(lab.snapshot_names("rawdom").is_empty());

    // External is the way; the snapshot records vdb as external and the
    // raw image keeps its bytes (nothing wrote a snapshot table into it).
    guest.set_ram_value("at-ext1").unwrap();
    lab.ok(&["snapshot-create-as", "rawdom", "ext1", "--external"]);
    let xml = lab.ok(&["snapshot-dumpxml", "rawdom", "ext1"]);
    assert!(
        xml.contains("<disk name='vdb' snapshot='external'"),
        "vdb must be snapshotted externally: {xml}"
    );
    assert_eq!(
        lab.ok(&["snapshot-list", "rawdom", "--internal", "--name"])
            .trim(),
        "",
        "no internal snapshot may exist on a domain with a raw disk"
    );
    assert!(
        fs::read(&raw).unwrap() == original,
        "the raw disk's bytes changed"
    );

    // Revert: the frozen raw image is still opened as raw.
    guest.set_ram_value("after-ext1").unwrap();
    lab.ok(&["snapshot-revert", "rawdom", "ext1"]);
    guest = lab.connect("rawdom");
    assert_eq!(guest.ram_value().unwrap(), "at-ext1");
    assert_eq!(guest.disk_checksum("vdb", 0, 1 << 20).unwrap(), header_sum);
    let nodes: serde_json::Value =
        serde_json::from_str(&lab.ok(&["qmp", "rawdom", "query-named-block-nodes"])).unwrap();
    for node in nodes.as_array().unwrap() {
        if node["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("vdb.raw"))
        {
            assert_ne!(
                node["drv"], "qcow2",
                "QEMU opened the raw disk as qcow2: {node}"
            );
        }
    }
}

/// A running domain for the name and path tests.
fn running_domain(lab: &Lab) -> vmsnap_testguest::Guest {
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "names",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    lab.start_guest("names")
}

#[test]
fn hostile_snapshot_names_and_spec_paths_are_refused_safely() {
    let lab = Lab::new("hostile-names");
    let mut guest = running_domain(&lab);
    guest.set_ram_value("steady").unwrap();
    let files_before = lab.lab_files();
    let state_before = lab.state_files();

    let bad_names = [
        "a/b",
        "..",
        ".",
        ".hidden",
        "../escape",
        "line\nbreak",
        "tab\tname",
        "esc\u{1b}[31mred",
        "del\u{7f}",
    ];
    // Broken promises found on the way, reported together at the end.
    let mut late: Vec<String> = Vec::new();
    for name in bad_names {
        for extra in [
            &[][..],
            &["--external"][..],
            &["--disk-only", "--external"][..],
        ] {
            let mut args = vec!["snapshot-create-as", "names", "--name", name];
            args.extend_from_slice(extra);
            let line = lab.fails(&args);
            // Echoing a hostile name raw lets it drive the user's terminal
            // (ESC sequences); checked at the end so the rest still runs.
            if line.chars().any(char::is_control) {
                late.push(format!("refusal echoes the name raw: {line:?}"));
            }
        }
    }
    // The same names through the document forms: libvirt XML and xl config.
    for (i, name) in ["../escape", "a/b", ".hidden"].iter().enumerate() {
        let xml = lab.path(&format!("bad{i}.xml"));
        fs::write(
            &xml,
            format!("<domainsnapshot><name>{name}</name></domainsnapshot>\n"),
        )
        .unwrap();
        lab.fails(&["snapshot-create", "names", xml.to_str().unwrap()]);
        let xl = lab.path(&format!("bad{i}.cfg"));
        fs::write(&xl, format!("name=\"{name}\"\ndescription=\"hostile\"\n")).unwrap();
        lab.fails(&["snapshot-create", "names", xl.to_str().unwrap()]);
    }
    assert!(lab.snapshot_names("names").is_empty(), "nothing recorded");
    assert!(!lab.path("escape").exists() && !lab.state().join("escape").exists());
    let files_after: Vec<_> = lab
        .lab_files()
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            !(s.starts_with("bad") && (s.ends_with(".xml") || s.ends_with(".cfg")))
        })
        .collect();
    assert_eq!(files_after, files_before, "no file appeared in the lab");
    assert_eq!(
        lab.state_files(),
        state_before,
        "no file appeared in the state dir"
    );

    // --memspec / --diskspec through a symlink to a file the user cares
    // about: the victim is never written or truncated.
    let victim = lab.path("victim");
    fs::write(&victim, b"precious data\n").unwrap();
    symlink(&victim, lab.path("memlink")).unwrap();
    symlink(&victim, lab.path("disklink")).unwrap();
    let outside = lab.path("outside");
    fs::create_dir(&outside).unwrap();
    symlink(outside.join("created.mem"), lab.path("dangling")).unwrap();
    let attempts: [&[&str]; 3] = [
        &[
            "snapshot-create-as",
            "names",
            "viamemlink",
            "--memspec",
            "file=memlink,snapshot=external",
            "--diskspec",
            "vda,snapshot=external,file=ov-memlink.qcow2",
        ],
        &[
            "snapshot-create-as",
            "names",
            "viadisklink",
            "--disk-only",
            "--diskspec",
            "vda,snapshot=external,file=disklink",
        ],
        &[
            "snapshot-create-as",
            "names",
            "viadangling",
            "--memspec",
            "file=dangling,snapshot=external",
            "--diskspec",
            "vda,snapshot=external,file=ov-dangling.qcow2",
        ],
    ];
    for args in attempts {
        lab.fails(args);
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious data\n",
            "vmsnap {args:?} wrote through a symlink"
        );
        assert!(
            !outside.join("created.mem").exists(),
            "vmsnap {args:?} created a file through a dangling symlink"
        );
        // Checked at the end, so the `..` case below still runs.
        for leftover in ["ov-memlink.qcow2", "ov-dangling.qcow2"] {
            if lab.path(leftover).exists() {
                late.push(format!("after {args:?}: {leftover} left behind"));
            }
        }
    }
    assert!(lab.snapshot_names("names").is_empty(), "nothing recorded");

    // `..` resolves to the place it names, and nowhere else.
    fs::create_dir(lab.path("sub")).unwrap();
    lab.ok(&[
        "snapshot-create-as",
        "names",
        "dotdot",
        "--memspec",
        "file=sub/../dotdot.mem,snapshot=external",
        "--diskspec",
        "vda,snapshot=external,file=sub/../dotdot.qcow2",
    ]);
    for file in ["dotdot.mem", "dotdot.qcow2"] {
        assert!(lab.path(file).is_file(), "{file} is where `..` points");
    }
    assert_eq!(fs::read_dir(lab.path("sub")).unwrap().count(), 0);
    let xml = lab.ok(&["snapshot-dumpxml", "names", "dotdot"]);
    for file in ["dotdot.mem", "dotdot.qcow2"] {
        let recorded = xml
            .split('\'')
            .find(|s| s.ends_with(file))
            .unwrap_or_else(|| panic!("{file} recorded in {xml}"));
        assert_eq!(
            fs::canonicalize(recorded).unwrap(),
            fs::canonicalize(lab.path(file)).unwrap()
        );
    }
    assert_eq!(
        guest.ram_value().unwrap(),
        "steady",
        "the guest was left alone"
    );
    late.dedup();
    assert!(late.is_empty(), "\n{}", late.join("\n"));
}

#[test]
fn state_directory_and_its_files_are_private_whatever_the_umask() {
    let lab = Lab::new("hostile-private");
    lab.set_umask(0);
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "priv",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    let mut problems = non_private_entries(&lab.state());
    lab.ok(&["snapshot-create-as", "priv", "offline"]);
    lab.ok(&["start", "priv"]);
    let mut guest = lab.connect("priv");
    guest.set_ram_value("private").unwrap();
    problems.extend(non_private_entries(&lab.state()));
    lab.ok(&["snapshot-create-as", "priv", "internal"]);
    lab.ok(&["snapshot-create-as", "priv", "external", "--external"]);
    lab.ok(&[
        "snapshot-create-as",
        "priv",
        "usermem",
        "--memspec",
        "file=user.mem,snapshot=external",
        "--diskspec",
        "vda,snapshot=external,file=user.qcow2",
    ]);
    problems.extend(non_private_entries(&lab.state()));
    // Guest RAM and disk data the user asked vmsnap to write elsewhere is
    // as private as the state directory.
    for file in ["user.mem", "user.qcow2"] {
        let mode = fs::metadata(lab.path(file)).unwrap().permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            problems.push(format!("{file} is {mode:o}"));
        }
    }
    lab.ok(&["snapshot-revert", "priv", "external"]);
    problems.extend(non_private_entries(&lab.state()));
    // The expected kinds of files really exist, so the check is not vacuous.
    let domain_dir = lab.state().join("domains/priv");
    for file in ["qmp.sock", "qemu.pid", "serial.log", "lock"] {
        assert!(
            domain_dir.join(file).exists(),
            "{file} exists while running"
        );
    }
    assert!(lab.state().join("vmsnap.db").exists());
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "state not private under umask 000:\n{}",
        problems.join("\n")
    );
}

#[test]
fn redefined_snapshot_metadata_never_makes_vmsnap_delete_files_it_did_not_create() {
    let lab = Lab::new("hostile-redefine");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.qemu_img_create(&["-f", "qcow2", "victim.qcow2", "64M"]);
    fs::write(lab.path("victim.mem"), b"precious\n").unwrap();
    lab.define(
        "redef",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    // Imported metadata naming files vmsnap never made: a user's file as
    // the memory image, another image and the domain's own live disk as
    // the snapshot's disks.
    let cases = [
        ("evil1", "victim.mem", "victim.qcow2"),
        ("evil2", "vda.qcow2", "vda.qcow2"),
    ];
    let sums = |lab: &Lab| -> Vec<String> {
        ["victim.mem", "victim.qcow2", "vda.qcow2"]
            .iter()
            .map(|f| {
                fs::read(lab.path(f))
                    .map(|d| vmsnap_testguest::sha256_hex(&d))
                    .unwrap_or_else(|_| format!("{f} missing"))
            })
            .collect()
    };
    let before = sums(&lab);
    for (name, memory, disk) in cases {
        let xml = lab.path(&format!("{name}.xml"));
        fs::write(
            &xml,
            format!(
                "<domainsnapshot>\n  <name>{name}</name>\n  <state>running</state>\n  \
                 <creationTime>1700000000</creationTime>\n  \
                 <memory snapshot='external' file='{}'/>\n  <disks>\n    \
                 <disk name='vda' snapshot='external' type='file'>\n      \
                 <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>\n  \
                 </disks>\n</domainsnapshot>\n",
                lab.path(memory).display(),
                lab.path(disk).display()
            ),
        )
        .unwrap();
        let out = lab.run(&[
            "snapshot-create",
            "redef",
            xml.to_str().unwrap(),
            "--redefine",
        ]);
        if !out.status.success() {
            // Refusing such metadata is fine too.
            hardening::refusal(&["snapshot-create", "--redefine"], &out);
            continue;
        }
        let out = lab.run(&["snapshot-delete", "redef", name]);
        if !out.status.success() {
            hardening::refusal(&["snapshot-delete", name], &out);
        }
        assert_eq!(
            sums(&lab),
            before,
            "deleting imported snapshot {name} touched files vmsnap did not create"
        );
    }
    // The domain still runs from its own disk.
    assert_eq!(
        lab.disk_sources("redef")["vda"],
        fs::canonicalize(lab.path("vda.qcow2"))
            .unwrap()
            .display()
            .to_string()
    );
}
