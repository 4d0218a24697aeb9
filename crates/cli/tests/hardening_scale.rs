//! Scale (issue 5 "Scale"): 200 real snapshots on one domain (internal,
//! disk-only, of a stopped domain, through vmsnap's qcow2 engine); the
//! read-only snapshot commands still answer in under 100 ms, and create and
//! delete still work.

#[path = "common/hardening.rs"]
mod hardening;

use std::time::{Duration, Instant};

use hardening::{qemu_img_check, DiskDef, Lab};

const SNAPSHOTS: usize = 200;
const BUDGET: Duration = Duration::from_millis(100);

/// Best of three wall times of `vmsnap args` (the whole process: exec,
/// store open, query, render), and its last stdout.
fn best_of_three(lab: &Lab, args: &[&str]) -> (Duration, String) {
    let mut best = Duration::MAX;
    let mut stdout = String::new();
    for _ in 0..3 {
        let started = Instant::now();
        let out = lab.bare_command(args).output().expect("spawn vmsnap");
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "vmsnap {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        best = best.min(took);
        stdout = String::from_utf8(out.stdout).unwrap();
    }
    (best, stdout)
}

#[test]
fn two_hundred_snapshots_stay_fast_to_list_and_still_change() {
    let lab = Lab::new("scale");
    lab.qemu_img_create(&["-f", "qcow2", "vda.qcow2", "64M"]);
    lab.define(
        "big",
        &[DiskDef {
            target: "vda",
            file: "vda.qcow2",
            format: "qcow2",
        }],
    );

    // A chain of 200 (each the child of the previous), then a branch: revert
    // to s0100 and create on from there, so the tree has real fan-out.
    let started = Instant::now();
    for i in 0..SNAPSHOTS - 20 {
        lab.ok(&["snapshot-create-as", "big", &format!("s{i:04}")]);
    }
    lab.ok(&["snapshot-revert", "big", "s0100"]);
    for i in SNAPSHOTS - 20..SNAPSHOTS {
        lab.ok(&["snapshot-create-as", "big", &format!("s{i:04}")]);
    }
    let creating = started.elapsed();
    eprintln!("created {SNAPSHOTS} snapshots in {creating:?}");

    let image = lab.path("vda.qcow2");
    let listed = vmsnap_qcow2_tags(&image);
    assert_eq!(
        listed, SNAPSHOTS,
        "every snapshot is a real internal snapshot in the image"
    );

    let (list_time, list) = best_of_three(&lab, &["snapshot-list", "big"]);
    assert_eq!(
        list.lines().count(),
        SNAPSHOTS + 3,
        "header, rule, rows, blank: {list}"
    );
    let (tree_time, tree) = best_of_three(&lab, &["snapshot-list", "big", "--tree"]);
    assert!(tree.contains("s0100") && tree.contains("s0199"));
    let (info_time, info) = best_of_three(&lab, &["snapshot-info", "big", "s0100"]);
    assert!(
        info.contains("Children:       2"),
        "s0100 has two children: {info}"
    );
    assert!(info.contains("Descendants:    99"), "{info}");
    eprintln!("snapshot-list {list_time:?}, --tree {tree_time:?}, snapshot-info {info_time:?}");
    for (what, took) in [
        ("snapshot-list", list_time),
        ("snapshot-list --tree", tree_time),
        ("snapshot-info", info_time),
    ] {
        assert!(
            took < BUDGET,
            "{what} with {SNAPSHOTS} snapshots took {took:?} (budget {BUDGET:?})"
        );
    }

    // Create and delete still work: a new leaf, an inner node, and the new leaf.
    lab.ok(&["snapshot-create-as", "big", "extra"]);
    lab.ok(&["snapshot-delete", "big", "s0050"]);
    lab.ok(&["snapshot-delete", "big", "extra"]);
    let names = lab.snapshot_names("big");
    assert_eq!(names.len(), SNAPSHOTS - 1);
    assert!(!names.iter().any(|n| n == "s0050" || n == "extra"));
    assert_eq!(
        lab.ok(&["snapshot-parent", "big", "s0051"]).trim(),
        "s0049",
        "deleting an inner node reparents its child"
    );
    assert_eq!(vmsnap_qcow2_tags(&image), SNAPSHOTS - 1);
    qemu_img_check(&image).unwrap();
}

/// Number of internal snapshots in the image, as qemu-img sees them.
fn vmsnap_qcow2_tags(image: &std::path::Path) -> usize {
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-U", "-l"])
        .arg(image)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .count()
}
