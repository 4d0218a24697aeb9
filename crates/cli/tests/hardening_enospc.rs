//! Disk full (DESIGN §5.5, issue 5 item 4): an external snapshot whose
//! memory image or overlay lands on a full filesystem fails cleanly: a
//! non-zero exit with a one-line reason, the VM running as before (its
//! counter advances, its RAM value intact), nothing recorded, the partial
//! file removed, every image passing `qemu-img check`, and the domain's
//! disk still on its previous active image.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs;
use std::path::Path;
use std::time::Duration;

use hardening::{qemu_img_check, refusal, DiskDef, Lab, Tmpfs, Violations};
use vmsnap_testguest::Guest;

/// What the domain looked like before a snapshot attempt, to compare after.
struct Before<'a> {
    sources: &'a std::collections::BTreeMap<String, String>,
    ram: &'a str,
    paused: bool,
}

/// Checks every promise of a failed snapshot attempt, recording what broke.
fn check_failed_cleanly(
    lab: &Lab,
    guest: &mut Guest,
    args: &[&str],
    partial_files: &[&Path],
    before: Before,
    v: &mut Violations,
) {
    let Before {
        sources: before_sources,
        ram,
        paused,
    } = before;
    let out = lab.run(args);
    if out.status.success() {
        v.record(format!("vmsnap {args:?} succeeded on a full filesystem"));
    } else {
        let line = std::panic::catch_unwind(|| refusal(args, &out));
        match line {
            Ok(line) => v.check(
                line.to_lowercase().contains("no space"),
                format!("{args:?}: the reason does not say the disk is full: {line}"),
            ),
            Err(_) => v.record(format!(
                "vmsnap {args:?}: not a one-line error: {:?}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }
    v.check(
        lab.snapshot_names("full").is_empty(),
        format!(
            "{args:?}: a snapshot was recorded: {:?}",
            lab.snapshot_names("full")
        ),
    );
    for file in partial_files {
        v.check(
            !file.exists(),
            format!("{args:?}: partial file {} left behind", file.display()),
        );
    }
    let state = lab.domain_state("full");
    let expected = if paused { "paused" } else { "running" };
    v.check(
        state == expected,
        format!("{args:?}: domain is {state:?}, not {expected}"),
    );
    let sources = lab.disk_sources("full");
    v.check(
        &sources == before_sources,
        format!("{args:?}: disks moved from {before_sources:?} to {sources:?}"),
    );
    if paused {
        let resumed = lab.run(&["resume", "full"]);
        v.check(
            resumed.status.success(),
            format!(
                "{args:?}: resume failed: {}",
                String::from_utf8_lossy(&resumed.stderr)
            ),
        );
    }
    // The guest goes on: its counter advances and its RAM value is intact.
    guest.set_call_timeout(Duration::from_secs(10));
    match guest.counter() {
        Ok(first) => {
            std::thread::sleep(Duration::from_millis(300));
            match guest.counter() {
                Ok(second) => v.check(
                    second > first,
                    format!("{args:?}: guest counter stuck at {first}"),
                ),
                Err(e) => v.record(format!("{args:?}: guest stopped answering: {e}")),
            }
        }
        Err(e) => v.record(format!("{args:?}: guest does not answer: {e}")),
    }
    match guest.ram_value() {
        Ok(value) => v.check(
            value == ram,
            format!("{args:?}: RAM value is {value:?}, not {ram:?}"),
        ),
        Err(e) => v.record(format!("{args:?}: cannot read guest RAM value: {e}")),
    }
    for image in [lab.path("vda.qcow2")]
        .into_iter()
        .chain(sources.values().map(Into::into))
    {
        if let Err(e) = qemu_img_check(&image) {
            v.record(format!("{args:?}: {e}"));
        }
    }
}

#[test]
fn snapshot_onto_a_full_filesystem_fails_cleanly() {
    let lab = Lab::new("enospc");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "full",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    let mut guest = lab.start_guest("full");
    guest.write_pattern("vda", 0, 1 << 20, 7).unwrap();
    guest.set_ram_value("before-enospc").unwrap();
    let sources = lab.disk_sources("full");
    let mut v = Violations::default();

    // 1. The overlay cannot be created: the filesystem is already full.
    let full = Tmpfs::mount(lab.path("full-fs"), "1m");
    let filler = full.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    let overlay = full.path().join("ov.qcow2");
    check_failed_cleanly(
        &lab,
        &mut guest,
        &[
            "snapshot-create-as",
            "full",
            "ovfull",
            "--disk-only",
            "--diskspec",
            &format!("vda,snapshot=external,file={}", overlay.display()),
        ],
        &[&overlay],
        Before {
            sources: &sources,
            ram: "before-enospc",
            paused: false,
        },
        &mut v,
    );
    drop(full);

    // 2. A paused guest's memory image outgrows a 16 MiB tmpfs (the guest
    //    has 128 MiB): the plain, paused migration path.
    let paused_fs = Tmpfs::mount(lab.path("paused-fs"), "16m");
    let memory = paused_fs.path().join("paused.mem");
    let overlay = lab.path("ov-paused.qcow2");
    lab.ok(&["suspend", "full"]);
    let sources = lab.disk_sources("full");
    check_failed_cleanly(
        &lab,
        &mut guest,
        &[
            "snapshot-create-as",
            "full",
            "pausedfull",
            "--memspec",
            &format!("file={},snapshot=external", memory.display()),
            "--diskspec",
            &format!("vda,snapshot=external,file={}", overlay.display()),
        ],
        &[&memory, &overlay],
        Before {
            sources: &sources,
            ram: "before-enospc",
            paused: true,
        },
        &mut v,
    );
    drop(paused_fs);

    // 3. A running guest's memory image outgrows a 16 MiB tmpfs: the
    //    background-snapshot path.
    let sources = lab.disk_sources("full");
    let small = Tmpfs::mount(lab.path("small-fs"), "16m");
    let memory = small.path().join("full.mem");
    let ok_overlay = lab.path("ov-mem.qcow2");
    check_failed_cleanly(
        &lab,
        &mut guest,
        &[
            "snapshot-create-as",
            "full",
            "memfull",
            "--memspec",
            &format!("file={},snapshot=external", memory.display()),
            "--diskspec",
            &format!("vda,snapshot=external,file={}", ok_overlay.display()),
        ],
        &[&memory, &ok_overlay],
        Before {
            sources: &sources,
            ram: "before-enospc",
            paused: false,
        },
        &mut v,
    );
    let free_listing: Vec<_> = fs::read_dir(small.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    v.check(
        free_listing.is_empty(),
        format!("the tmpfs still holds {free_listing:?}"),
    );
    v.assert_none("ENOSPC");

    // Still usable afterwards: a snapshot with room succeeds.
    lab.ok(&["snapshot-create-as", "full", "roomy", "--external"]);
    assert_eq!(lab.snapshot_names("full"), ["roomy"]);
}

/// Every internal snapshot tag in `image`, as qemu-img lists them.
fn image_tags(image: &Path) -> Vec<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(image)
        .output()
        .unwrap();
    let mut tags: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    tags.sort();
    tags
}

#[test]
fn full_state_directory_fails_cleanly_and_still_lists() {
    let lab = Lab::new("enospc-state");
    // The state directory itself lives on a small filesystem.
    let state_fs = Tmpfs::mount(lab.state(), "4m");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "meta",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );
    lab.ok(&["snapshot-create-as", "meta", "a"]);
    let filler = state_fs.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    let image = lab.path("vda.qcow2");
    let mut v = Violations::default();

    let args = ["snapshot-create-as", "meta", "b"];
    let out = lab.run(&args);
    match std::panic::catch_unwind(|| refusal(&args, &out)) {
        Ok(line) => v.check(
            line.to_lowercase().contains("space"),
            format!("the reason does not say the disk is full: {line}"),
        ),
        Err(_) => v.record(format!(
            "snapshot-create-as on a full state dir: exit {:?}, stderr {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
    v.check(
        image_tags(&image) == ["a"],
        format!("the image holds tags {:?}, not just a", image_tags(&image)),
    );
    let list = lab.run(&["snapshot-list", "meta", "--name"]);
    v.check(
        list.status.success() && String::from_utf8_lossy(&list.stdout).trim() == "a",
        format!(
            "read-only snapshot-list must work on a full disk: exit {:?}, {:?}",
            list.status.code(),
            String::from_utf8_lossy(&list.stderr)
        ),
    );

    // Room again: everything works and metadata and image agree.
    fs::remove_file(&filler).unwrap();
    lab.ok(&["snapshot-create-as", "meta", "c"]);
    assert_eq!(lab.snapshot_names("meta"), ["a", "c"]);
    assert_eq!(image_tags(&image), ["a", "c"]);
    qemu_img_check(&image).unwrap();
    v.assert_none("full state directory");
}
