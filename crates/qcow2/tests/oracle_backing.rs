//! External chains: overlays our engine creates over qcow2 and raw backing files, reads
//! falling through the chain, copy-on-write from the backing file, commit and rebase
//! (unsafe and safe) judged against `qemu-img` doing the same on a copy of the chain,
//! and the refusals: backing loops, backing files of unknown format.

mod common;

use std::path::{Path, PathBuf};

use vmsnap_qcow2::{BackingFile, BackingPolicy, Compat, CreateOptions, ImageFormat, Qcow2Image};

use common::engine;
use common::oracle::{self, qemu_io};
use common::raw::{self, field};
use common::{assert_same_bytes, Scratch};

const MIB: u64 = 1024 * 1024;

/// Creates an overlay through our engine. `backing_name` is stored as given (relative
/// names resolve against the overlay's directory, as QEMU does).
fn create_overlay(
    path: &Path,
    size: u64,
    cluster_size: u32,
    backing_name: &str,
    format: ImageFormat,
) {
    let options = CreateOptions {
        size,
        cluster_size,
        compat: Compat::V3,
        refcount_bits: 16,
        backing: Some(BackingFile {
            path: backing_name.to_string(),
            format,
        }),
    };
    vmsnap_qcow2::create(path, ImageFormat::Qcow2, &options)
        .unwrap_or_else(|e| panic!("create overlay {} over {backing_name}: {e}", path.display()));
}

fn open_with(path: &Path, writable: bool, backing: BackingPolicy) -> Result<Qcow2Image, String> {
    engine::try_open(path, writable, backing).map_err(|e| e.to_string())
}

/// A qcow2 base written by qemu-io with a few patterns, 4 MiB, 4 KiB clusters.
fn qcow2_base(dir: &Scratch, name: &str) -> PathBuf {
    let path = dir.path(name);
    oracle::qemu_create(&path, 4 * MIB, "cluster_size=4096");
    qemu_io(
        &path,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 1536k 64k",
            "write -P 0x13 3M 4k",
        ],
    );
    path
}

/// A raw base with a pattern in every MiB.
fn raw_base(dir: &Scratch, name: &str, size: u64) -> PathBuf {
    let path = dir.path(name);
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(MIB as usize).enumerate() {
        chunk[..300_000].fill(0x20 + i as u8);
    }
    std::fs::write(&path, data).unwrap();
    path
}

fn info_backing(path: &Path) -> (Option<String>, Option<String>) {
    let info = oracle::qemu_info(path);
    (
        info.get("backing-filename")
            .and_then(|v| v.as_str())
            .map(String::from),
        info.get("backing-filename-format")
            .and_then(|v| v.as_str())
            .map(String::from),
    )
}

#[test]
fn overlay_over_qcow2_reads_through_and_copies_on_write() {
    let dir = Scratch::new();
    let base = qcow2_base(&dir, "base.qcow2");
    let base_bytes_before = common::read_file(&base);
    let overlay = dir.path("overlay.qcow2");
    // Different cluster size from the base, so copy-on-write must gather partial clusters.
    create_overlay(&overlay, 4 * MIB, 65536, "base.qcow2", ImageFormat::Qcow2);
    assert_eq!(
        info_backing(&overlay),
        (Some("base.qcow2".into()), Some("qcow2".into())),
        "qemu-img info of our overlay"
    );
    oracle::assert_qemu_check_clean(&overlay, "fresh overlay");

    let mut model = oracle::qemu_read_raw(&base, None);
    let mut image = engine::open_rw(&overlay);
    common::assert_engine_view(&mut image, 4 * MIB, &model, "reads fall through");
    for (offset, len, byte) in [
        (100u64, 10usize, 0xa1u8),
        (65536 - 5, 10, 0xa2),
        (1536 * 1024 + 4000, 70_000, 0xa3),
        (3 * MIB + 1, 1, 0xa4),
    ] {
        image
            .write_at(offset, &vec![byte; len])
            .expect("write into overlay");
        model[offset as usize..offset as usize + len].fill(byte);
    }
    common::assert_engine_then_qemu_view(image, &overlay, 4 * MIB, &model, "overlay after writes");
    assert!(
        base_bytes_before == common::read_file(&base),
        "writes to the overlay changed the base"
    );
}

#[test]
fn overlay_larger_than_raw_base_reads_zeros_past_the_base() {
    let dir = Scratch::new();
    raw_base(&dir, "base.raw", 2 * MIB);
    let overlay = dir.path("overlay.qcow2");
    create_overlay(&overlay, 3 * MIB, 65536, "base.raw", ImageFormat::Raw);
    assert_eq!(
        info_backing(&overlay),
        (Some("base.raw".into()), Some("raw".into()))
    );
    let expected = oracle::qemu_read_raw(&overlay, None);
    assert_eq!(expected.len() as u64, 3 * MIB);
    let mut image = engine::open_rw(&overlay);
    common::assert_engine_view(&mut image, 3 * MIB, &expected, "read through raw base");
    // A write straddling the end of the base.
    image.write_at(2 * MIB - 100, &[0x77; 200]).expect("write");
    drop(image);
    let mut model = expected;
    model[(2 * MIB - 100) as usize..(2 * MIB + 100) as usize].fill(0x77);
    common::assert_qemu_view(&overlay, &model, "after straddling write");
    oracle::assert_qemu_check_clean(&overlay, "overlay over raw");
}

#[test]
fn three_level_chain_reads_through_both_levels() {
    let dir = Scratch::new();
    raw_base(&dir, "base.raw", 4 * MIB);
    let mid = dir.path("mid.qcow2");
    oracle::qemu_create_overlay(&mid, "base.raw", "raw", &[], None);
    qemu_io(&mid, &["write -P 0x55 512k 1M"]);
    let top = dir.path("top.qcow2");
    create_overlay(&top, 4 * MIB, 4096, "mid.qcow2", ImageFormat::Qcow2);
    let expected = oracle::qemu_read_raw(&top, None);
    let mut image = engine::open_ro(&top);
    common::assert_engine_view(&mut image, 4 * MIB, &expected, "read through two levels");
}

#[test]
fn ignore_policy_reads_zeros_where_the_overlay_has_nothing() {
    let dir = Scratch::new();
    qcow2_base(&dir, "base.qcow2");
    let overlay = dir.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 65536, "base.qcow2", ImageFormat::Qcow2);
    let mut image =
        open_with(&overlay, false, BackingPolicy::Ignore).expect("open ignoring backing");
    let all = engine::read_all(&mut image, 4 * MIB);
    assert!(
        all.iter().all(|&b| b == 0),
        "with the backing ignored, nothing is allocated"
    );
}

/// Copies a directory's files, so the copy's relative backing names stay self-contained.
fn copy_dir(from: &Scratch, to: &Scratch, names: &[&str]) {
    for name in names {
        std::fs::copy(from.path(name), to.path(name)).unwrap();
    }
}

#[test]
fn commit_matches_qemu_img_commit() {
    for base_format in ["qcow2", "raw"] {
        let ours = Scratch::new();
        let base_name = format!("base.{base_format}");
        if base_format == "qcow2" {
            qcow2_base(&ours, &base_name);
        } else {
            raw_base(&ours, &base_name, 4 * MIB);
        }
        let overlay = ours.path("overlay.qcow2");
        let format = if base_format == "qcow2" {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        };
        create_overlay(&overlay, 4 * MIB, 65536, &base_name, format);
        let mut image = engine::open_rw(&overlay);
        image.write_at(12_345, &[0xc1; 100_000]).unwrap();
        image.write_at(3 * MIB + 7, &[0xc2; 9]).unwrap();
        drop(image);
        let view_before = oracle::qemu_read_raw(&overlay, None);

        let theirs = Scratch::new();
        copy_dir(&ours, &theirs, &[&base_name, "overlay.qcow2"]);
        oracle::qemu_img_ok(&[
            "commit",
            "-q",
            "-f",
            "qcow2",
            theirs.path("overlay.qcow2").to_str().unwrap(),
        ]);

        vmsnap_qcow2::commit(&overlay).unwrap_or_else(|e| panic!("commit into {base_format}: {e}"));

        let read_base =
            |dir: &Scratch| oracle::qemu_read_raw_format(&dir.path(&base_name), base_format);
        let qemu_base = read_base(&theirs);
        assert_same_bytes(
            &view_before,
            &qemu_base,
            "qemu-img commit result is the overlay view",
        );
        assert_same_bytes(
            &qemu_base,
            &read_base(&ours),
            &format!("our commit into {base_format}"),
        );
        if base_format == "qcow2" {
            oracle::assert_qemu_check_clean(&ours.path(&base_name), "base after our commit");
        }
        oracle::assert_qemu_check_clean(&overlay, "overlay after our commit");
        // qemu-img commit empties the overlay (without -d); so must we.
        assert_eq!(
            oracle::qemu_check(&overlay).count("allocated-clusters"),
            oracle::qemu_check(&theirs.path("overlay.qcow2")).count("allocated-clusters"),
            "clusters left in the overlay after commit, ours vs qemu-img's"
        );
        common::assert_qemu_view(&overlay, &view_before, "overlay view after commit");
    }
}

#[test]
fn unsafe_rebase_only_changes_the_backing_name() {
    let ours = Scratch::new();
    qcow2_base(&ours, "a.qcow2");
    raw_base(&ours, "b.raw", 4 * MIB);
    let overlay = ours.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 65536, "a.qcow2", ImageFormat::Qcow2);
    let mut image = engine::open_rw(&overlay);
    image.write_at(MIB, &[0xd1; 5000]).unwrap();
    drop(image);

    let theirs = Scratch::new();
    copy_dir(&ours, &theirs, &["a.qcow2", "b.raw", "overlay.qcow2"]);
    oracle::qemu_img_ok(&[
        "rebase",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.raw",
        "-F",
        "raw",
        theirs.path("overlay.qcow2").to_str().unwrap(),
    ]);

    vmsnap_qcow2::rebase(
        &overlay,
        Some(BackingFile {
            path: "b.raw".to_string(),
            format: ImageFormat::Raw,
        }),
        true,
    )
    .expect("rebase -u");
    assert_eq!(
        info_backing(&overlay),
        (Some("b.raw".into()), Some("raw".into()))
    );
    oracle::assert_qemu_check_clean(&overlay, "after rebase -u");
    assert_same_bytes(
        &oracle::qemu_read_raw(&theirs.path("overlay.qcow2"), None),
        &oracle::qemu_read_raw(&overlay, None),
        "our rebase -u vs qemu-img's",
    );
}

#[test]
fn safe_rebase_keeps_the_guest_view() {
    for target in [Some(("b.raw", "raw")), None] {
        let ours = Scratch::new();
        qcow2_base(&ours, "a.qcow2");
        raw_base(&ours, "b.raw", 4 * MIB);
        let overlay = ours.path("overlay.qcow2");
        create_overlay(&overlay, 4 * MIB, 4096, "a.qcow2", ImageFormat::Qcow2);
        let mut image = engine::open_rw(&overlay);
        image.write_at(MIB - 3, &[0xe1; 70_000]).unwrap();
        drop(image);
        let view = oracle::qemu_read_raw(&overlay, None);

        let theirs = Scratch::new();
        copy_dir(&ours, &theirs, &["a.qcow2", "b.raw", "overlay.qcow2"]);
        let theirs_overlay = theirs.path("overlay.qcow2");
        match target {
            Some((name, fmt)) => oracle::qemu_img_ok(&[
                "rebase",
                "-q",
                "-f",
                "qcow2",
                "-b",
                name,
                "-F",
                fmt,
                theirs_overlay.to_str().unwrap(),
            ]),
            None => oracle::qemu_img_ok(&[
                "rebase",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "",
                theirs_overlay.to_str().unwrap(),
            ]),
        };

        let new_backing = target.map(|(name, _)| BackingFile {
            path: name.to_string(),
            format: ImageFormat::Raw,
        });
        vmsnap_qcow2::rebase(&overlay, new_backing, false)
            .unwrap_or_else(|e| panic!("safe rebase onto {target:?}: {e}"));
        let what = format!("safe rebase onto {target:?}");
        oracle::assert_qemu_check_clean(&overlay, &what);
        common::assert_qemu_view(&overlay, &view, &format!("{what}: guest view"));
        assert_same_bytes(
            &oracle::qemu_read_raw(&theirs_overlay, None),
            &oracle::qemu_read_raw(&overlay, None),
            &format!("{what}: vs qemu-img"),
        );
        let expected_backing = target
            .map(|(n, f)| (Some(n.to_string()), Some(f.to_string())))
            .unwrap_or((None, None));
        assert_eq!(info_backing(&overlay), expected_backing, "{what}: header");
    }
}

#[test]
fn backing_loop_is_refused() {
    let dir = Scratch::new();
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    let self_loop = dir.path("self.qcow2");
    for (image, backing) in [(&a, "b.qcow2"), (&b, "a.qcow2"), (&self_loop, "self.qcow2")] {
        oracle::qemu_create_overlay(image, backing, "qcow2", &["-u"], Some("1M"));
    }
    for path in [&a, &self_loop] {
        let before = common::read_file(path);
        for writable in [false, true] {
            match open_with(path, writable, BackingPolicy::FromHeader) {
                Ok(_) => panic!("{} opened despite a backing loop", path.display()),
                Err(message) => common::assert_one_line_error(
                    &message,
                    &[path.file_name().unwrap().to_str().unwrap()],
                    "backing loop",
                ),
            }
        }
        common::assert_unchanged(&before, path, "a refused open wrote to the image");
    }
}

/// Removes the backing-format header extension by renaming it to an unknown extension
/// (QEMU 7.2 will not create such an image any more, but older ones exist).
fn strip_backing_format(path: &Path) {
    let header = raw::Header::read(path);
    let mut offset = u64::from(header.header_length);
    loop {
        let kind = raw::peek_u32(path, offset);
        let len = u64::from(raw::peek_u32(path, offset + 4));
        if kind == 0 {
            panic!("no backing format extension in {}", path.display());
        }
        if kind == 0xe279_2aca {
            raw::poke_u32(path, offset, 0x7654_3210);
            return;
        }
        offset += 8 + len.div_ceil(8) * 8;
    }
}

#[test]
fn backing_file_without_format_is_never_probed() {
    let dir = Scratch::new();
    // The backing file is a qcow2 image: probing would "work" and must not happen.
    qcow2_base(&dir, "base.qcow2");
    let overlay = dir.path("overlay.qcow2");
    oracle::qemu_create_overlay(&overlay, "base.qcow2", "qcow2", &[], None);
    strip_backing_format(&overlay);
    assert!(
        raw::peek_u64(&overlay, field::BACKING_FILE_OFFSET) != 0,
        "still names a backing file"
    );
    let before = common::read_file(&overlay);
    match open_with(&overlay, false, BackingPolicy::FromHeader) {
        Ok(_) => panic!("a backing file of unknown format was followed"),
        Err(message) => common::assert_one_line_error(
            &message,
            &["overlay.qcow2", "base.qcow2"],
            "backing file of unknown format",
        ),
    }
    // Told the format explicitly, the chain works.
    let explicit = BackingPolicy::Explicit(BackingFile {
        path: dir.path("base.qcow2").to_str().unwrap().to_string(),
        format: ImageFormat::Qcow2,
    });
    let mut image =
        open_with(&overlay, false, explicit).expect("open with an explicit backing format");
    let expected = oracle::qemu_read_raw(&dir.path("base.qcow2"), None);
    common::assert_engine_view(&mut image, 4 * MIB, &expected, "read with explicit backing");
    drop(image);
    common::assert_unchanged(&before, &overlay, "opening wrote to the overlay");
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = Scratch::new();
    let overlay = dir.path("orphan.qcow2");
    oracle::qemu_create_overlay(&overlay, "gone.qcow2", "qcow2", &["-u"], Some("1M"));
    match open_with(&overlay, false, BackingPolicy::FromHeader) {
        Ok(_) => panic!("opened with a missing backing file"),
        Err(message) => {
            common::assert_one_line_error(&message, &["gone.qcow2"], "missing backing file")
        }
    }
}

/// A base smaller than the overlay: QEMU's commit grows the base so it can hold the
/// overlay's data past the old end. Ours must leave the same bytes.
#[test]
fn commit_into_a_smaller_base_matches_qemu_img() {
    let ours = Scratch::new();
    let base = ours.path("base.qcow2");
    oracle::qemu_create(&base, 2 * MIB, "cluster_size=65536");
    qemu_io(&base, &["write -P 0x21 0 2M"]);
    let overlay = ours.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 65536, "base.qcow2", ImageFormat::Qcow2);
    let mut image = engine::open_rw(&overlay);
    image.write_at(3 * MIB + 5, &[0x22; 70_000]).unwrap();
    image.write_at(MIB, &[0x23; 100]).unwrap();
    drop(image);
    let view = oracle::qemu_read_raw(&overlay, None);

    let theirs = Scratch::new();
    copy_dir(&ours, &theirs, &["base.qcow2", "overlay.qcow2"]);
    let committed_by_qemu = oracle::qemu_img(&[
        "commit",
        "-q",
        "-f",
        "qcow2",
        theirs.path("overlay.qcow2").to_str().unwrap(),
    ]);
    let ours_result = vmsnap_qcow2::commit(&overlay);
    match (committed_by_qemu.status.success(), ours_result) {
        (true, Ok(_)) => {
            let qemu_base = oracle::qemu_read_raw(&theirs.path("base.qcow2"), None);
            common::assert_qemu_view(&base, &qemu_base, "bases");
            oracle::assert_qemu_check_clean(&base, "base after commit");
            common::assert_qemu_view(&overlay, &view, "overlay view");
        }
        (true, Err(e)) => panic!("qemu-img commits into a smaller base, we refused: {e}"),
        (false, Ok(_)) => panic!("we committed where qemu-img refused"),
        (false, Err(_)) => {}
    }
}

/// Safe rebase onto a smaller backing file: data the old chain had past the new
/// backing's end must be copied into the overlay so the guest view stays the same.
#[test]
fn safe_rebase_onto_a_smaller_backing_keeps_the_view() {
    let dir = Scratch::new();
    let old = dir.path("old.qcow2");
    oracle::qemu_create(&old, 4 * MIB, "cluster_size=4096");
    qemu_io(&old, &["write -P 0x31 0 4M"]);
    raw_base(&dir, "new.raw", 2 * MIB);
    let overlay = dir.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 65536, "old.qcow2", ImageFormat::Qcow2);
    let view = oracle::qemu_read_raw(&overlay, None);
    vmsnap_qcow2::rebase(
        &overlay,
        Some(BackingFile {
            path: "new.raw".to_string(),
            format: ImageFormat::Raw,
        }),
        false,
    )
    .expect("safe rebase onto a smaller raw file");
    oracle::assert_qemu_check_clean(&overlay, "after rebase");
    common::assert_qemu_view(&overlay, &view, "guest view");
}

/// Copy-on-write from compressed clusters of the backing file.
#[test]
fn partial_writes_over_a_compressed_backing_file() {
    let dir = Scratch::new();
    let raw = dir.path("content.raw");
    let mut content = vec![0u8; 4 * MIB as usize];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 1000) as u8 ^ (i % 7) as u8;
    }
    std::fs::write(&raw, &content).unwrap();
    let base = dir.path("base.qcow2");
    oracle::qemu_convert_compressed(&raw, &base, "cluster_size=65536");
    assert!(oracle::qemu_check(&base).count("compressed-clusters") > 0);
    let overlay = dir.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 4096, "base.qcow2", ImageFormat::Qcow2);
    let mut image = engine::open_rw(&overlay);
    for (offset, len) in [
        (1u64, 1usize),
        (65536 - 3, 9),
        (MIB + 4095, 2),
        (3 * MIB, 70_000),
    ] {
        image.write_at(offset, &vec![0xcc; len]).unwrap();
        content[offset as usize..offset as usize + len].fill(0xcc);
    }
    common::assert_engine_then_qemu_view(
        image,
        &overlay,
        4 * MIB,
        &content,
        "overlay over compressed base",
    );
}

/// Internal snapshots of an overlay: what a snapshot does not store still falls through
/// to the backing file after apply.
#[test]
fn internal_snapshots_on_an_overlay() {
    let dir = Scratch::new();
    let base = qcow2_base(&dir, "base.qcow2");
    let overlay = dir.path("overlay.qcow2");
    create_overlay(&overlay, 4 * MIB, 65536, "base.qcow2", ImageFormat::Qcow2);
    let mut model = oracle::qemu_read_raw(&base, None);
    let mut image = engine::open_rw(&overlay);
    image.write_at(10, &[0x41; 100]).unwrap();
    model[10..110].fill(0x41);
    image.create_snapshot("s").unwrap();
    let at_snapshot = model.clone();
    image.write_at(MIB - 50, &[0x42; 100_000]).unwrap();
    image.apply_snapshot("s").unwrap();
    common::assert_engine_then_qemu_view(
        image,
        &overlay,
        4 * MIB,
        &at_snapshot,
        "overlay with a snapshot, after apply",
    );
}

/// Zero clusters (v3) in an overlay hide the backing file's data; unallocated ones
/// (discarded on v2) show it again.
#[test]
fn zero_clusters_mask_the_backing_file() {
    for compat in ["1.1", "0.10"] {
        let dir = Scratch::new();
        let base = qcow2_base(&dir, "base.qcow2");
        let overlay = dir.path("overlay.qcow2");
        oracle::qemu_create_overlay(
            &overlay,
            "base.qcow2",
            "qcow2",
            &["-o", &format!("compat={compat},cluster_size=65536")],
            None,
        );
        qemu_io(
            &overlay,
            &["write -P 0x51 0 128k", "write -z 0 64k", "write -z 200k 8k"],
        );
        let expected = oracle::qemu_read_raw(&overlay, None);
        let base_view = oracle::qemu_read_raw(&base, None);
        assert_ne!(
            &expected[..65536],
            &base_view[..65536],
            "compat {compat}: zeros differ from base"
        );
        let mut image = engine::open_ro(&overlay);
        common::assert_engine_view(
            &mut image,
            4 * MIB,
            &expected,
            &format!("compat {compat}: zero clusters over a backing file"),
        );
    }
}

/// Relative backing names resolve against the overlay's directory, not the caller's.
#[test]
fn relative_backing_name_from_another_directory() {
    let dir = Scratch::new();
    let base = qcow2_base(&dir, "base.qcow2");
    std::fs::create_dir(dir.path("sub")).unwrap();
    let overlay = dir.path("sub/overlay.qcow2");
    create_overlay(
        &overlay,
        4 * MIB,
        65536,
        "../base.qcow2",
        ImageFormat::Qcow2,
    );
    assert_eq!(
        info_backing(&overlay),
        (Some("../base.qcow2".into()), Some("qcow2".into()))
    );
    let expected = oracle::qemu_read_raw(&base, None);
    let mut image = engine::open_ro(&overlay);
    common::assert_engine_view(&mut image, 4 * MIB, &expected, "read through ../");
    drop(image);
    common::assert_qemu_view(&overlay, &expected, "qemu agrees");
}

/// A backing file recorded as raw is raw even when its bytes look like qcow2: reads
/// show the file's bytes (header and all), exactly as QEMU shows them.
#[test]
fn raw_backing_that_looks_like_qcow2_stays_raw() {
    let dir = Scratch::new();
    let disguised = qcow2_base(&dir, "disguised.img");
    let size = std::fs::metadata(&disguised).unwrap().len();
    let overlay = dir.path("overlay.qcow2");
    let overlay_size = size.div_ceil(512) * 512;
    create_overlay(
        &overlay,
        overlay_size,
        65536,
        "disguised.img",
        ImageFormat::Raw,
    );
    let expected = oracle::qemu_read_raw(&overlay, None);
    assert_eq!(
        &expected[..4],
        b"QFI\xfb",
        "QEMU shows the qcow2 header bytes"
    );
    let mut image = engine::open_ro(&overlay);
    common::assert_engine_view(
        &mut image,
        overlay_size,
        &expected,
        "raw backing file read as raw",
    );
}
