//! Engine tests against qemu-img/qemu-io 7.2 as the oracle (small images, a few seconds).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::*;

fn qemu(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_qemu_clean(path: &Path) {
    let (ok, text) = qemu("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
}

fn qemu_read(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension("raw-out");
    let mut args = vec!["convert".to_string()];
    if let Some(s) = snapshot {
        args.push("-l".into());
        args.push(format!("snapshot.name={s}"));
    }
    args.extend([
        "-O".into(),
        "raw".into(),
        path.to_str().unwrap().into(),
        out.to_str().unwrap().into(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = qemu("qemu-img", &refs);
    assert!(ok, "qemu-img convert: {text}");
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        backing: BackingPolicy::FromHeader,
    }
}

fn new_image(
    dir: &Path,
    name: &str,
    size: u64,
    cluster: u32,
    compat: Compat,
    bits: u32,
) -> PathBuf {
    let p = dir.join(name);
    create(
        &p,
        ImageFormat::Qcow2,
        &CreateOptions {
            size,
            cluster_size: cluster,
            compat,
            refcount_bits: bits,
            backing: None,
        },
    )
    .unwrap();
    p
}

/// A deterministic pseudo-random generator so failures reproduce.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn random_writes(img: &mut Qcow2Image, model: &mut [u8], rng: &mut Lcg, count: usize) {
    let size = model.len() as u64;
    for _ in 0..count {
        let off = rng.next() % size;
        let len = (1 + rng.next() % 20000).min(size - off) as usize;
        let byte = (rng.next() % 255 + 1) as u8;
        let data = vec![byte; len];
        img.write_at(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

#[test]
fn written_images_and_snapshots_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (i, &(cluster, compat, bits)) in [
        (512u32, Compat::V3, 16u32),
        (4096, Compat::V2, 16),
        (65536, Compat::V3, 4),
        (2 << 20, Compat::V3, 64),
    ]
    .iter()
    .enumerate()
    {
        let size = 8u64 << 20;
        let path = new_image(
            dir.path(),
            &format!("t{i}.qcow2"),
            size,
            cluster,
            compat,
            bits,
        );
        assert_qemu_clean(&path);
        let mut model = vec![0u8; size as usize];
        let mut rng = Lcg(i as u64 + 1);
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        {
            let mut img = Qcow2Image::open(&path, rw()).unwrap();
            for round in 0..4 {
                random_writes(&mut img, &mut model, &mut rng, 30);
                let name = format!("s{round}");
                let info = img.create_snapshot(&name).unwrap();
                assert_eq!(info.id, (round + 1).to_string());
                snaps.push((name, model.clone()));
            }
            random_writes(&mut img, &mut model, &mut rng, 30);
            img.flush().unwrap();
        }
        assert_qemu_clean(&path);
        assert!(
            qemu_read(&path, None) == model,
            "active state differs ({cluster})"
        );
        for (name, data) in &snaps {
            assert!(
                qemu_read(&path, Some(name)) == *data,
                "snapshot {name} differs ({cluster})"
            );
        }
        {
            let mut img = Qcow2Image::open(&path, rw()).unwrap();
            img.delete_snapshot("s1").unwrap();
            img.apply_snapshot("s2").unwrap();
            let mut buf = vec![0u8; size as usize];
            img.read_at(0, &mut buf).unwrap();
            assert!(
                buf == snaps[2].1,
                "applied snapshot reads wrong ({cluster})"
            );
            random_writes(&mut img, &mut model, &mut rng, 10);
            img.delete_snapshot("s0").unwrap();
            let report = img.check(None).unwrap();
            assert_eq!(
                (report.corruptions, report.leaks),
                (0, 0),
                "{:?}",
                report.messages
            );
        }
        assert_qemu_clean(&path);
        let (_, list) = qemu("qemu-img", &["snapshot", "-l", path.to_str().unwrap()]);
        assert!(
            list.contains("s2") && list.contains("s3") && !list.contains("s0 "),
            "{list}"
        );
        assert!(qemu_read(&path, Some("s3")) == snaps[3].1);
        // Deleting every snapshot gives the space back: no leaks, all COPIED again.
        {
            let mut img = Qcow2Image::open(&path, rw()).unwrap();
            img.delete_snapshot("s2").unwrap();
            img.delete_snapshot("s3").unwrap();
            assert!(img.snapshots().is_empty());
        }
        assert_qemu_clean(&path);
    }
}

#[test]
fn reads_what_qemu_wrote_including_compressed_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    assert!(
        qemu(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", "cluster_size=4096", ps, "4M"]
        )
        .0
    );
    assert!(
        qemu(
            "qemu-io",
            &["-c", "write -P 0x11 0 1M", "-c", "write -z 64k 64k", ps]
        )
        .0
    );
    assert!(qemu("qemu-img", &["snapshot", "-c", "first", ps]).0);
    assert!(qemu("qemu-io", &["-c", "write -P 0x22 512k 1M", ps]).0);
    let active = qemu_read(&p, None);
    let first = qemu_read(&p, Some("first"));
    {
        let mut img = Qcow2Image::open(&p, OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(0, &mut buf).unwrap();
        assert!(buf == active);
        let report = img.check(None).unwrap();
        assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
        assert_eq!(img.snapshots()[0].name, "first");
    }
    {
        let mut img = Qcow2Image::open(&p, rw()).unwrap();
        img.apply_snapshot("first").unwrap();
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(0, &mut buf).unwrap();
        assert!(buf == first);
        img.delete_snapshot("1").unwrap();
    }
    assert_qemu_clean(&p);
    assert!(qemu_read(&p, None) == first);

    // Compressed clusters, deflate and zstd.
    for ctype in ["zlib", "zstd"] {
        let c = dir.path().join(format!("c-{ctype}.qcow2"));
        let opt = format!("compression_type={ctype},cluster_size=4096");
        assert!(
            qemu(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &opt,
                    ps,
                    c.to_str().unwrap()
                ]
            )
            .0
        );
        let mut img = Qcow2Image::open(&c, OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(0, &mut buf).unwrap();
        assert!(buf == first, "compressed {ctype} reads wrong");
        assert!(img.check(None).unwrap().compressed_clusters > 0);
        drop(img);
        // Writing over compressed data copies it out; qemu-img still agrees.
        let mut img = Qcow2Image::open(&c, rw()).unwrap();
        img.create_snapshot("keep").unwrap();
        img.write_at(1000, b"hello").unwrap();
        drop(img);
        assert_qemu_clean(&c);
        let mut expect = first.clone();
        expect[1000..1005].copy_from_slice(b"hello");
        assert!(qemu_read(&c, None) == expect);
        assert!(qemu_read(&c, Some("keep")) == first);
    }
}

#[test]
fn overlays_commit_and_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    create(
        &base,
        ImageFormat::Raw,
        &CreateOptions {
            size: 2 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut raw = RawImage::open(&base, true).unwrap();
    raw.write_at(0, &vec![7u8; 2 << 20]).unwrap();
    drop(raw);
    let top = dir.path().join("top.qcow2");
    let backing = BackingFile {
        path: "base.raw".into(),
        format: ImageFormat::Raw,
    };
    create(
        &top,
        ImageFormat::Qcow2,
        &CreateOptions {
            backing: Some(backing),
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = Qcow2Image::open(&top, rw()).unwrap();
    assert_eq!(img.size(), 2 << 20);
    img.write_at(100_000, &[9u8; 5000]).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    img.read_at(0, &mut buf).unwrap();
    drop(img);
    assert_qemu_clean(&top);
    assert!(qemu_read(&top, None) == buf);
    let (_, info) = qemu("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(info.contains("backing file format: raw"), "{info}");

    // Safe rebase onto nothing keeps the guest view.
    rebase(&top, None, false).unwrap();
    assert_qemu_clean(&top);
    assert!(qemu_read(&top, None) == buf);
    // Unsafe rebase back, then commit into the base.
    rebase(
        &top,
        Some(BackingFile {
            path: "base.raw".into(),
            format: ImageFormat::Raw,
        }),
        true,
    )
    .unwrap();
    let report = commit(&top).unwrap();
    assert!(report.bytes_copied >= 5000);
    assert_eq!(std::fs::read(&base).unwrap(), buf);
    assert_qemu_clean(&top);
    let img = Qcow2Image::open(&top, OpenOptions::default()).unwrap();
    assert_eq!(img.info().backing_format.as_deref(), Some("raw"));
}

#[test]
fn check_finds_and_repairs_leaks_and_refcount_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "r.qcow2", 4 << 20, 4096, Compat::V3, 16);
    {
        let mut img = Qcow2Image::open(&p, rw()).unwrap();
        img.write_at(0, &[1u8; 100_000]).unwrap();
        img.create_snapshot("a").unwrap();
        img.write_at(0, &[2u8; 10_000]).unwrap();
    }
    let ps = p.to_str().unwrap();
    // Leak: raise the refcount of cluster 100 (past everything in use) by poking its block.
    let (_, map) = qemu("qemu-img", &["check", ps]);
    assert!(map.contains("No errors"), "{map}");
    let mut img = Qcow2Image::open(&p, rw()).unwrap();
    let end = img.check(None).unwrap().image_end_offset / 4096;
    img.alloc_clusters(3).unwrap();
    img.flush().unwrap();
    let r = img.check(None).unwrap();
    assert_eq!(
        (r.leaks, r.corruptions, r.exit_code()),
        (3, 0, 3),
        "{:?}",
        r.messages
    );
    assert!(
        r.messages[0].starts_with(&format!("Leaked cluster {end} refcount=1 reference=0")),
        "{:?}",
        r.messages
    );
    let r = img.check(Some(RepairMode::Leaks)).unwrap();
    assert_eq!((r.leaks_fixed, r.leaks), (3, 0));
    drop(img);
    assert_qemu_clean(&p);

    // Refcount too low: a data cluster of the snapshot shows refcount 1 instead of 2.
    let mut img = Qcow2Image::open(&p, rw()).unwrap();
    let raw = img.raw_l2_entry(20).unwrap();
    let host = raw & vmsnap_qcow2_format::OFFSET_MASK;
    assert_eq!(img.refcount(host / 4096).unwrap(), 2);
    img.add_refcount(host, 0, -1).unwrap();
    img.flush().unwrap();
    let r = img.check(None).unwrap();
    assert!(r.corruptions >= 1 && r.exit_code() == 2, "{:?}", r);
    drop(img);
    let (ok, _) = qemu("qemu-img", &["check", ps]);
    assert!(!ok);
    let mut img = Qcow2Image::open_for_check(&p, true).unwrap();
    let r = img.check(Some(RepairMode::All)).unwrap();
    assert!(r.corruptions_fixed >= 1 && r.corruptions == 0, "{:?}", r);
    drop(img);
    assert_qemu_clean(&p);
}

#[test]
fn refuses_bad_images_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_image(dir.path(), "b.qcow2", 1 << 20, 65536, Compat::V3, 16);
    let good = std::fs::read(&p).unwrap();
    let cases: &[(usize, &[u8], ErrorKind)] = &[
        (0, b"QFI\x00", ErrorKind::Corrupt),
        (36, &[0xff, 0xff, 0xff, 0xff], ErrorKind::Corrupt),
        (40, &[0, 0, 0, 0, 0, 0x10, 0, 0], ErrorKind::Corrupt),
        (48, &[0, 0, 0, 0, 0, 0, 0, 0], ErrorKind::Corrupt),
        (60, &[0, 0, 0, 5], ErrorKind::Corrupt),
        (72, &[0, 0, 0, 0, 0, 0, 1, 0], ErrorKind::Unsupported),
        (40, &[0, 0, 0, 0, 0, 1, 0, 0], ErrorKind::Corrupt),
    ];
    for (i, (off, bytes, kind)) in cases.iter().enumerate() {
        let bad = dir.path().join(format!("bad{i}.qcow2"));
        let mut data = good.clone();
        data[*off..off + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&bad, &data).unwrap();
        let err = Qcow2Image::open(&bad, OpenOptions::default())
            .err()
            .unwrap_or_else(|| panic!("case {i} opened"));
        assert_eq!(err.kind(), *kind, "case {i}: {err}");
        assert!(
            err.to_string().contains("bad"),
            "message names the image: {err}"
        );
        assert_eq!(std::fs::read(&bad).unwrap(), data, "nothing written");
    }
    for len in [0usize, 3, 50, 100, 4096, good.len() - 1] {
        let t = dir.path().join("trunc.qcow2");
        std::fs::write(&t, &good[..len]).unwrap();
        let _ = Qcow2Image::open(&t, OpenOptions::default());
    }
    // A backing chain loop.
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b2.qcow2");
    create(
        &a,
        ImageFormat::Qcow2,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    create(
        &b,
        ImageFormat::Qcow2,
        &CreateOptions {
            backing: Some(BackingFile {
                path: "a.qcow2".into(),
                format: ImageFormat::Qcow2,
            }),
            ..Default::default()
        },
    )
    .unwrap();
    rebase(
        &a,
        Some(BackingFile {
            path: "b2.qcow2".into(),
            format: ImageFormat::Qcow2,
        }),
        true,
    )
    .unwrap();
    let err = Qcow2Image::open(&b, OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("loop"), "{err}");
}

/// Kills each snapshot operation after every possible number of writes (the state a
/// SIGKILL leaves: a prefix of the writes issued) and asks qemu-img what it thinks.
///
/// What must hold at every prefix: no refcount is lower than its references (that would
/// let a later write destroy snapshot data), the snapshot table lists only complete
/// snapshots, and `check -r all` brings back an image whose every listed snapshot reads
/// exactly as it was. The only inconsistencies allowed are leaks and stale COPIED flags
/// (QEMU's own order has the same windows; they cost an extra copy, never data).
#[test]
fn every_crash_point_of_snapshot_operations_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let base = new_image(dir.path(), "base.qcow2", 1 << 20, 512, Compat::V3, 16);
    let mut model = vec![0u8; 1 << 20];
    let mut rng = Lcg(7);
    let mut states: Vec<(String, Vec<u8>)> = Vec::new();
    {
        let mut img = Qcow2Image::open(&base, rw()).unwrap();
        for name in ["s1", "s2"] {
            random_writes(&mut img, &mut model, &mut rng, 40);
            img.create_snapshot(name).unwrap();
            states.push((name.to_string(), model.clone()));
        }
        random_writes(&mut img, &mut model, &mut rng, 40);
    }
    type Op = fn(&mut Qcow2Image) -> Result<()>;
    let ops: [(&str, Op); 3] = [
        ("create", |i| i.create_snapshot("new").map(|_| ())),
        ("delete", |i| i.delete_snapshot("s1")),
        ("apply", |i| i.apply_snapshot("s1")),
    ];
    for (op_name, op) in ops {
        let mut completed = false;
        let mut writes = 0usize;
        while !completed {
            let p = dir.path().join(format!("crash-{op_name}-{writes}.qcow2"));
            std::fs::copy(&base, &p).unwrap();
            {
                let mut img = Qcow2Image::open(&p, rw()).unwrap();
                img.crash_after_writes = Some(writes);
                completed = op(&mut img).is_ok() && img.flush().is_ok() && !img.crashed;
            }
            let ps = p.to_str().unwrap();
            let (_, text) = qemu("qemu-img", &["check", ps]);
            for line in text.lines().filter(|l| l.starts_with("ERROR")) {
                assert!(
                    line.starts_with("ERROR OFLAG_COPIED"),
                    "{op_name} killed after {writes} writes: {line}\n{text}"
                );
            }
            let (ok, text) = qemu("qemu-img", &["check", "-r", "all", ps]);
            assert!(ok, "{op_name} after {writes} writes: repair failed: {text}");
            assert_qemu_clean(&p);
            let (_, list) = qemu("qemu-img", &["snapshot", "-l", ps]);
            for (name, data) in &states {
                if list.contains(&format!(" {name} ")) {
                    assert!(
                        qemu_read(&p, Some(name)) == *data,
                        "{op_name} killed after {writes} writes: snapshot {name} changed"
                    );
                }
            }
            if list.contains(" new ") {
                assert!(
                    qemu_read(&p, Some("new")) == model,
                    "{op_name} killed after {writes} writes: the new snapshot reads wrong"
                );
            }
            let active = qemu_read(&p, None);
            assert!(
                active == model || (op_name == "apply" && active == states[0].1),
                "{op_name} killed after {writes} writes: active state is neither before nor after"
            );
            std::fs::remove_file(&p).unwrap();
            if completed {
                // Every prefix was tried: the operation needs at least this many writes.
                assert!(writes > 2, "{op_name} finished after only {writes} writes");
            }
            writes += 1;
            assert!(writes < 10_000, "{op_name} never completes");
        }
    }
}

/// Bugs-hardening B8: an L2 entry that maps guest data onto the refcount table. Creating,
/// deleting or applying a snapshot would change the refcount of the refcount table through
/// it (free or share it), so each is refused, names the structure, and writes nothing.
#[test]
fn snapshot_operations_refuse_data_mapped_onto_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_image(dir.path(), "b8.qcow2", 4 << 20, 4096, Compat::V3, 16);
    {
        let mut img = Qcow2Image::open(&path, rw()).unwrap();
        img.write_at(0, &[0x5a; 8192]).unwrap();
        img.create_snapshot("s0").unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let refcount_table = be64(&bytes, 48);
    let l2 = (be64(&bytes, l1) & vmsnap_qcow2_format::OFFSET_MASK) as usize;
    // The L2 table is shared by the active state and s0: both trees now point at it.
    bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | refcount_table).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let mut img = Qcow2Image::open(&path, rw()).unwrap();
    let attempts: [(&str, Result<()>); 3] = [
        ("create", img.create_snapshot("s1").map(|_| ())),
        ("delete", img.delete_snapshot("s0")),
        ("apply", img.apply_snapshot("s0")),
    ];
    for (what, result) in attempts {
        let err = result.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("guest offset 0x0") && text.contains("refcount table"),
            "{what}: {text}"
        );
    }
    drop(img);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "a refused snapshot operation changed the image"
    );
}
