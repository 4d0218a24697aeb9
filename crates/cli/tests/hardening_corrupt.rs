//! Corrupt images (DESIGN §5.5: "a corrupt image ... gets a non-zero exit
//! and a one-line reason, and changes nothing"): qcow2 files with broken
//! header fields, tables pointing past the end of the file, absurd sizes
//! and truncation. `vmsnap img info/check/snapshot -l` never panic or hang;
//! `define` and the stopped-domain snapshot commands refuse in one line and
//! leave every byte of the image as it was.

#[path = "common/hardening.rs"]
mod hardening;

use std::fs;
use std::path::Path;
use std::process::Command;

use hardening::{DiskDef, Lab, Violations};

/// A healthy qcow2 image with data, an internal snapshot, and its L2 tables.
fn healthy(lab: &Lab, file: &str) {
    lab.qemu_img_create(&["-f", "qcow2", file, "64M"]);
    let path = lab.path(file);
    for (pattern, offset) in [(0x5a, "0"), (0x6b, "32M")] {
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern} {offset} 1M"),
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let out = Command::new("qemu-img")
        .args(["snapshot", "-c", "s0"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn be_u64(data: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(data[at..at + 8].try_into().unwrap())
}

fn put_u64(data: &mut [u8], at: usize, value: u64) {
    data[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(data: &mut [u8], at: usize, value: u32) {
    data[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// Bytes poked into an image to damage it.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// The damage done to each case's image, by name.
fn corruptions() -> Vec<(&'static str, Damage)> {
    vec![
        (
            "l1-past-eof",
            Box::new(|d: &mut Vec<u8>| put_u64(d, 40, 1 << 50)),
        ),
        (
            "l1-size-huge",
            Box::new(|d: &mut Vec<u8>| put_u32(d, 36, 0x7fff_ffff)),
        ),
        (
            "cluster-bits-40",
            Box::new(|d: &mut Vec<u8>| put_u32(d, 20, 40)),
        ),
        (
            "refcount-table-in-header",
            Box::new(|d: &mut Vec<u8>| put_u64(d, 48, 0)),
        ),
        (
            "snapshot-count-huge",
            Box::new(|d: &mut Vec<u8>| put_u32(d, 60, 65_000)),
        ),
        (
            "virtual-size-huge",
            Box::new(|d: &mut Vec<u8>| put_u64(d, 24, 1 << 62)),
        ),
        (
            "l2-entry-past-eof",
            Box::new(|d: &mut Vec<u8>| {
                let l1 = be_u64(d, 40) as usize;
                let l2 = (be_u64(d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
                put_u64(d, l2, (1 << 63) | (1 << 45));
            }),
        ),
        (
            "l2-entry-on-refcount-table",
            Box::new(|d: &mut Vec<u8>| {
                let l1 = be_u64(d, 40) as usize;
                let refcount_table = be_u64(d, 48);
                let l2 = (be_u64(d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
                // The guest's first cluster is the refcount table: a guest
                // write there would destroy the image's allocation state.
                put_u64(d, l2, (1 << 63) | refcount_table);
            }),
        ),
        ("truncated", Box::new(|d: &mut Vec<u8>| d.truncate(1000))),
    ]
}

fn sha(path: &Path) -> String {
    vmsnap_testguest::sha256_hex(&fs::read(path).unwrap())
}

#[test]
fn corrupt_images_are_refused_in_one_line_and_never_changed() {
    let lab = Lab::new("corrupt");
    let mut v = Violations::default();
    for (name, damage) in corruptions() {
        let file = format!("{name}.qcow2");
        healthy(&lab, &file);
        let path = lab.path(&file);
        let mut data = fs::read(&path).unwrap();
        damage(&mut data);
        fs::write(&path, &data).unwrap();
        let before = sha(&path);

        // Inspection: any verdict, but no panic, no signal, no hang.
        for args in [
            vec!["img", "info", file.as_str()],
            vec!["img", "check", file.as_str()],
            vec!["img", "snapshot", "-l", file.as_str()],
            vec!["img", "info", "--output=json", file.as_str()],
        ] {
            let out = lab.run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0..=3) => {}
                code => v.record(format!("{name}: vmsnap {args:?} exit {code:?}: {stderr}")),
            }
            v.check(
                !stderr.contains("panicked"),
                format!("{name}: vmsnap {args:?} panicked: {stderr}"),
            );
        }

        // A domain on it: define refuses, or the snapshot commands do.
        let config = lab.write_config(
            name,
            128,
            &[DiskDef {
                target: "vda",
                file: &file,
                format: "qcow2",
            }],
        );
        let define = lab.run(&["define", config.to_str().unwrap()]);
        if define.status.success() {
            lab.track(name);
            // An internal snapshot rewrites the image's tables: it must
            // refuse. External and disk-only ones only put an overlay on
            // top and may go ahead, as long as the image stays untouched.
            let internal = ["snapshot-create-as", name, "s1"];
            let out = lab.run(&internal);
            check_refusal(&mut v, name, &internal, &out);
            for args in [
                ["snapshot-create-as", name, "e1", "--external"],
                ["snapshot-create-as", name, "d1", "--disk-only"],
            ] {
                let out = lab.run(&args);
                if !out.status.success() {
                    check_refusal(&mut v, name, &args, &out);
                }
            }
            let listed = lab.snapshot_names(name);
            v.check(
                !listed.iter().any(|s| s == "s1"),
                format!("{name}: an internal snapshot was recorded on a corrupt image"),
            );
        } else {
            check_refusal(&mut v, name, &["define"], &define);
        }
        v.check(
            sha(&path) == before,
            format!("{name}: the corrupt image was modified"),
        );
    }
    v.assert_none("corrupt images");
}

fn check_refusal(v: &mut Violations, name: &str, args: &[&str], out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    v.check(
        out.status.code() == Some(1)
            && stderr.lines().count() == 1
            && stderr.starts_with("error: "),
        format!(
            "{name}: vmsnap {args:?} should refuse in one line, got exit {:?}: {stderr:?}",
            out.status.code()
        ),
    );
}
