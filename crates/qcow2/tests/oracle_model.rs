//! Model-based oracle tests: random guest writes and snapshot create/apply/delete through
//! OUR engine, checked against an in-memory model and against QEMU 7.2's own reading of
//! the image (`qemu-img check`, `info`, `convert`), over the layouts qcow2 allows.
//!
//! Replay a failure with `VMSNAP_TEST_SEED=<seed> cargo test -p vmsnap-qcow2 --test
//! oracle_model <name>` (`VMSNAP_TEST_TRACE=1` prints every operation); soak locally with
//! other seeds and `VMSNAP_TEST_SCALE=<n>` (n times more steps).

mod common;

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmsnap_qcow2::{Compat, Qcow2Image};

use common::engine::{self, Layout};
use common::model::DiskModel;
use common::oracle;
use common::{assert_same_bytes, Scratch};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Who performs an operation in a scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Driver {
    /// Every operation goes through our engine.
    EngineOnly,
    /// About a third of the operations go through qemu-io / qemu-img instead, so our
    /// engine keeps working on what QEMU changed and vice versa.
    Interleaved,
}

/// One configuration of the random test.
struct Scenario {
    name: &'static str,
    layout: Layout,
    /// Start from an image whose data clusters `qemu-img convert -c` compressed with this
    /// compression type ("zlib" or "zstd").
    compressed: Option<&'static str>,
    steps: usize,
    max_snapshots: usize,
    driver: Driver,
    seed: u64,
}

fn layout(size: u64, cluster_size: u32, compat: Compat, refcount_bits: u32) -> Layout {
    Layout {
        size,
        cluster_size,
        compat,
        refcount_bits,
    }
}

/// Runs a scenario: the random sequence with oracle checks at two midpoints and at the
/// end, then deletes every snapshot and checks that their storage came back.
fn run(scenario: Scenario) {
    let seed = common::seed(scenario.seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let scratch = Scratch::new();
    let path = scratch.path("disk.qcow2");
    let layout = scenario.layout;
    let size = layout.size;

    let mut model = match scenario.compressed {
        Some(compression) => {
            let initial = compressible_content(&mut rng, size, u64::from(layout.cluster_size));
            let raw = scratch.path("initial.raw");
            std::fs::write(&raw, &initial).expect("write initial raw data");
            let options = format!("{},compression_type={compression}", layout.qemu_options());
            oracle::qemu_convert_compressed(&raw, &path, &options);
            let check = oracle::qemu_check(&path);
            assert!(
                check.count("compressed-clusters") > 0,
                "{}: qemu-img convert -c made no compressed clusters: {}",
                scenario.name,
                check.json
            );
            DiskModel::with_data(initial)
        }
        None => {
            engine::create_qcow2(&path, &layout);
            DiskModel::zeroed(size)
        }
    };

    let mut log = OpLog::new(scenario.name, seed);
    verify_with_qemu(&path, &model, &log.context("freshly made image"));

    let mut image = Some(engine::open_rw(&path));
    if scenario.compressed.is_some() {
        let all = engine::read_all(image.as_mut().unwrap(), size);
        assert_same_bytes(
            &model.active,
            &all,
            &log.context("engine read of compressed clusters"),
        );
    }

    // VMSNAP_TEST_SCALE=N runs N times as many steps (for local soak runs, not CI).
    let steps = scenario.steps * scale();
    let checkpoints = [steps / 3, 2 * steps / 3];
    let mut names_made = 0usize;
    for step in 0..steps {
        log.step = step;
        let by_qemu = scenario.driver == Driver::Interleaved && rng.gen_ratio(1, 3);
        let roll = rng.gen_range(0..100);
        if roll < 62 {
            let (offset, data) = random_write(&mut rng, size, u64::from(layout.cluster_size));
            if by_qemu {
                // qemu-io writes a fill pattern, sector aligned.
                let offset = offset & !511;
                let len = (data.len() as u64).div_ceil(512) * 512;
                let len = len.min(size - offset);
                let pattern = rng.gen::<u8>();
                log.push(format!(
                    "qemu-io write -P {pattern:#x} {offset:#x} {len:#x}"
                ));
                drop(image.take());
                oracle::qemu_io(&path, &[&format!("write -P {pattern} {offset} {len}")]);
                model.write(offset, &vec![pattern; len as usize]);
                image = Some(engine::open_rw(&path));
            } else {
                log.push(format!("write {offset:#x} +{:#x}", data.len()));
                let img = image.as_mut().unwrap();
                img.write_at(offset, &data)
                    .unwrap_or_else(|e| panic!("{}: write failed: {e}", log.context("")));
                model.write(offset, &data);
                check_range(img, &model, offset, data.len(), size, &log);
            }
        } else if roll < 74 {
            if model.snapshots.len() >= scenario.max_snapshots {
                continue;
            }
            names_made += 1;
            let name = format!("snap{names_made}-{}", rng.gen_range(0..1000));
            log.push(format!("snapshot -c {name}"));
            snapshot_command(&mut image, &path, by_qemu, "-c", &name, &log);
            model.create_snapshot(&name);
            check_snapshot_list(image.as_mut().unwrap(), &model, &log);
        } else if roll < 84 {
            if model.snapshots.is_empty() {
                continue;
            }
            let (target, name) = pick_snapshot(&mut rng, &model, true);
            log.push(format!("snapshot -a {target}"));
            snapshot_command(&mut image, &path, by_qemu, "-a", &target, &log);
            model.apply_snapshot(&name);
            let all = engine::read_all(image.as_mut().unwrap(), size);
            assert_same_bytes(&model.active, &all, &log.context("engine read after apply"));
        } else if roll < 93 {
            if model.snapshots.is_empty() {
                continue;
            }
            // qemu-img snapshot -d looks snapshots up by name only (-a takes ids too).
            let (target, name) = pick_snapshot(&mut rng, &model, !by_qemu);
            log.push(format!("snapshot -d {target}"));
            snapshot_command(&mut image, &path, by_qemu, "-d", &target, &log);
            model.delete_snapshot(&name);
            check_snapshot_list(image.as_mut().unwrap(), &model, &log);
        } else {
            log.push("close and reopen".to_string());
            let mut img = image.take().unwrap();
            img.flush()
                .unwrap_or_else(|e| panic!("{}: flush: {e}", log.context("")));
            drop(img);
            image = Some(engine::open_rw(&path));
            let offset = rng.gen_range(0..size);
            let len = rng.gen_range(1..=(size - offset).min(256 * KIB)) as usize;
            check_range(image.as_mut().unwrap(), &model, offset, len, size, &log);
        }

        if checkpoints.contains(&step) {
            drop(image.take());
            verify_with_qemu(&path, &model, &log.context("midpoint"));
            image = Some(engine::open_rw(&path));
        }
    }

    let mut img = image.take().unwrap();
    img.flush().expect("flush at the end");
    let all = engine::read_all(&mut img, size);
    assert_same_bytes(&model.active, &all, &log.context("engine read at the end"));
    drop(img);
    verify_with_qemu(&path, &model, &log.context("end of sequence"));

    // Delete every snapshot: the image must hold the active state alone, leak-free.
    let mut img = engine::open_rw(&path);
    for snapshot in model.snapshots.clone() {
        img.delete_snapshot(&snapshot.name)
            .unwrap_or_else(|e| panic!("{}: final delete: {e}", log.context("")));
        model.delete_snapshot(&snapshot.name);
    }
    drop(img);
    verify_with_qemu(&path, &model, &log.context("after deleting every snapshot"));
    let check = oracle::qemu_check(&path);
    let data_clusters = size.div_ceil(u64::from(layout.cluster_size));
    assert!(
        check.count("allocated-clusters") <= data_clusters,
        "{}: after deleting every snapshot qemu-img check counts {} allocated clusters, \
         more than the disk's {data_clusters}",
        log.context(""),
        check.count("allocated-clusters")
    );
}

/// The step multiplier from `VMSNAP_TEST_SCALE` (default 1).
fn scale() -> usize {
    std::env::var("VMSNAP_TEST_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// What happened so far, for failure messages that let a human replay the sequence.
struct OpLog {
    scenario: &'static str,
    seed: u64,
    step: usize,
    ops: Vec<String>,
}

impl OpLog {
    fn new(scenario: &'static str, seed: u64) -> Self {
        OpLog {
            scenario,
            seed,
            step: 0,
            ops: Vec::new(),
        }
    }

    fn push(&mut self, op: String) {
        if std::env::var_os("VMSNAP_TEST_TRACE").is_some() {
            eprintln!("[{} step {}] {op}", self.scenario, self.step);
        }
        self.ops.push(op);
    }

    fn context(&self, what: &str) -> String {
        let tail: Vec<&str> = self
            .ops
            .iter()
            .rev()
            .take(8)
            .rev()
            .map(String::as_str)
            .collect();
        format!(
            "[{} seed {} step {}] {what} (last ops: {})",
            self.scenario,
            self.seed,
            self.step,
            tail.join("; ")
        )
    }
}

/// A random guest write: sizes from a byte to several clusters, often straddling cluster
/// (and for small clusters L2-table) boundaries, with random, patterned or zero bytes.
fn random_write(rng: &mut StdRng, size: u64, cluster: u64) -> (u64, Vec<u8>) {
    let (offset, len) = match rng.gen_range(0..10) {
        0..=2 => {
            let len = rng.gen_range(1..=cluster.min(4 * KIB));
            (rng.gen_range(0..=size - len), len)
        }
        3 | 4 => {
            // Straddle a cluster boundary.
            let boundary = rng.gen_range(1..size / cluster) * cluster;
            let before = rng.gen_range(1..=(cluster / 2).min(8 * KIB));
            let after = rng.gen_range(1..=(cluster / 2).min(8 * KIB));
            (boundary - before, before + after)
        }
        5 | 6 => {
            let len = rng
                .gen_range(cluster / 2..=3 * cluster)
                .min(3 * MIB)
                .min(size);
            (rng.gen_range(0..=size - len), len)
        }
        7 => {
            let index = rng.gen_range(0..size / cluster);
            (index * cluster, cluster)
        }
        8 => {
            // Long write crossing L2 tables when clusters are small.
            let l2_span = cluster * (cluster / 8);
            let len = (l2_span + cluster).min(4 * MIB).min(size);
            (rng.gen_range(0..=size - len), len)
        }
        _ => {
            let sectors = rng.gen_range(1..=16u64);
            let len = (sectors * 512).min(size);
            let offset = rng.gen_range(0..=(size - len) / 512) * 512;
            (offset, len)
        }
    };
    let mut data = vec![0u8; len as usize];
    match rng.gen_range(0..4) {
        0 | 1 => rng.fill(&mut data[..]),
        2 => data.fill(rng.gen_range(1..=255)),
        _ => {} // zeros over possibly allocated data
    }
    (offset, data)
}

/// Initial disk content that compresses well in some clusters, not at all in others, and
/// leaves some clusters zero (unallocated after convert).
fn compressible_content(rng: &mut StdRng, size: u64, cluster: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (index, chunk) in data.chunks_mut(cluster as usize).enumerate() {
        match rng.gen_range(0..5) {
            0 => {} // zero
            1 => rng.fill(chunk),
            _ => {
                let text = format!("cluster {index} of a compressible disk; ");
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[i % text.len()];
                }
            }
        }
    }
    data
}

/// Reads a range (with a margin into the neighbouring clusters) through our engine.
fn check_range(
    image: &mut Qcow2Image,
    model: &DiskModel,
    offset: u64,
    len: usize,
    size: u64,
    log: &OpLog,
) {
    let start = offset.saturating_sub(777);
    let end = (offset + len as u64 + 777).min(size);
    let got = engine::read(image, start, (end - start) as usize);
    assert_same_bytes(
        model.read(start, (end - start) as usize),
        &got,
        &log.context(&format!("engine read {start:#x}..{end:#x}")),
    );
}

/// Picks a random snapshot of the model: returns how to address it (by id now and then
/// when `ids_allowed`, as `qemu-img snapshot -a 3` may) and its name.
fn pick_snapshot(rng: &mut StdRng, model: &DiskModel, ids_allowed: bool) -> (String, String) {
    let pick = rng.gen_range(0..model.snapshots.len());
    let by_id = rng.gen_ratio(1, 4) && ids_allowed;
    let snapshot = &model.snapshots[pick];
    let target = if by_id {
        snapshot.id.clone()
    } else {
        snapshot.name.clone()
    };
    (target, snapshot.name.clone())
}

/// `qemu-img snapshot FLAG TARGET` (`-c`, `-a` or `-d`) done by qemu-img with our image
/// closed when `by_qemu`, otherwise by our engine on the open image.
fn snapshot_command(
    image: &mut Option<Qcow2Image>,
    path: &Path,
    by_qemu: bool,
    flag: &str,
    target: &str,
    log: &OpLog,
) {
    if by_qemu {
        drop(image.take());
        oracle::qemu_img_ok(&["snapshot", flag, target, path.to_str().unwrap()]);
        *image = Some(engine::open_rw(path));
        return;
    }
    let ours = image.as_mut().unwrap();
    let (operation, result) = match flag {
        "-c" => ("create_snapshot", ours.create_snapshot(target).map(drop)),
        "-a" => ("apply_snapshot", ours.apply_snapshot(target)),
        "-d" => ("delete_snapshot", ours.delete_snapshot(target)),
        _ => panic!("no snapshot command {flag}"),
    };
    result.unwrap_or_else(|e| panic!("{}: {operation}: {e}", log.context("")));
}

/// Our engine's snapshot list against the model: same ids and names, same order,
/// no VM state, the disk size of the image.
fn check_snapshot_list(image: &mut Qcow2Image, model: &DiskModel, log: &OpLog) {
    let listed = image
        .snapshots()
        .into_iter()
        .map(|s| (s.id.to_string(), s.name.to_string()))
        .collect::<Vec<_>>();
    let expected = model
        .snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect::<Vec<_>>();
    assert_eq!(listed, expected, "{}", log.context("engine snapshot list"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    for snapshot in image.snapshots() {
        assert_eq!(
            snapshot.vm_state_size,
            0,
            "{}",
            log.context("a disk-only snapshot has no VM state")
        );
        assert_eq!(
            snapshot.disk_size,
            model.active.len() as u64,
            "{}",
            log.context("snapshot disk size")
        );
        assert!(
            u64::from(snapshot.date_sec).abs_diff(now) < 3600 && snapshot.date_nsec < 1_000_000_000,
            "{}",
            log.context(&format!(
                "snapshot {} dated {}.{:09}, not now ({now})",
                snapshot.name, snapshot.date_sec, snapshot.date_nsec
            ))
        );
    }
}

/// QEMU's view of the image must match the model exactly: clean check, same snapshot
/// list, every snapshot and the active state byte-identical.
fn verify_with_qemu(path: &Path, model: &DiskModel, context: &str) {
    oracle::assert_qemu_check_clean(path, context);
    common::assert_check_agrees_with_qemu(path, context);
    let listed: Vec<(String, String)> = oracle::qemu_snapshots(path)
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    let expected: Vec<(String, String)> = model
        .snapshots
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    assert_eq!(listed, expected, "{context}: qemu-img info snapshot list");
    assert_eq!(
        oracle::qemu_snapshot_list_text(path),
        expected,
        "{context}: qemu-img snapshot -l"
    );
    common::assert_qemu_reads_model(path, model, context);
}

#[test]
fn cluster_512_v3_refcount16() {
    run(Scenario {
        name: "512B v3 rc16",
        layout: layout(2 * MIB, 512, Compat::V3, 16),
        compressed: None,
        steps: 90,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 512316,
    });
}

#[test]
fn cluster_512_v2() {
    run(Scenario {
        name: "512B v2",
        layout: layout(2 * MIB, 512, Compat::V2, 16),
        compressed: None,
        steps: 70,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 5122,
    });
}

#[test]
fn cluster_4k_v3_refcount16() {
    run(Scenario {
        name: "4K v3 rc16",
        layout: layout(6 * MIB, 4096, Compat::V3, 16),
        compressed: None,
        steps: 90,
        max_snapshots: 6,
        driver: Driver::EngineOnly,
        seed: 4316,
    });
}

#[test]
fn cluster_4k_v2() {
    run(Scenario {
        name: "4K v2",
        layout: layout(4 * MIB, 4096, Compat::V2, 16),
        compressed: None,
        steps: 80,
        max_snapshots: 6,
        driver: Driver::EngineOnly,
        seed: 42,
    });
}

#[test]
fn cluster_4k_v3_refcount64() {
    run(Scenario {
        name: "4K v3 rc64",
        layout: layout(4 * MIB, 4096, Compat::V3, 64),
        compressed: None,
        steps: 80,
        max_snapshots: 6,
        driver: Driver::EngineOnly,
        seed: 4364,
    });
}

#[test]
fn cluster_4k_v3_refcount4_few_snapshots() {
    // 4-bit refcounts hold at most 15 references: five snapshots plus the active L1 fit.
    run(Scenario {
        name: "4K v3 rc4",
        layout: layout(4 * MIB, 4096, Compat::V3, 4),
        compressed: None,
        steps: 80,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 434,
    });
}

#[test]
fn cluster_64k_v3_refcount16() {
    run(Scenario {
        name: "64K v3 rc16",
        layout: layout(8 * MIB, 65536, Compat::V3, 16),
        compressed: None,
        steps: 90,
        max_snapshots: 6,
        driver: Driver::EngineOnly,
        seed: 64316,
    });
}

#[test]
fn cluster_64k_v2() {
    run(Scenario {
        name: "64K v2",
        layout: layout(8 * MIB, 65536, Compat::V2, 16),
        compressed: None,
        steps: 70,
        max_snapshots: 6,
        driver: Driver::EngineOnly,
        seed: 642,
    });
}

#[test]
fn cluster_64k_v3_refcount64() {
    run(Scenario {
        name: "64K v3 rc64",
        layout: layout(8 * MIB, 65536, Compat::V3, 64),
        compressed: None,
        steps: 60,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 64364,
    });
}

#[test]
fn cluster_2m_v3_refcount16() {
    run(Scenario {
        name: "2M v3 rc16",
        layout: layout(16 * MIB, 2 * MIB as u32, Compat::V3, 16),
        compressed: None,
        steps: 40,
        max_snapshots: 4,
        driver: Driver::EngineOnly,
        seed: 2316,
    });
}

#[test]
fn cluster_2m_v2() {
    run(Scenario {
        name: "2M v2",
        layout: layout(16 * MIB, 2 * MIB as u32, Compat::V2, 16),
        compressed: None,
        steps: 30,
        max_snapshots: 3,
        driver: Driver::EngineOnly,
        seed: 22,
    });
}

#[test]
fn compressed_64k_v3_zlib() {
    run(Scenario {
        name: "compressed 64K v3 zlib",
        layout: layout(8 * MIB, 65536, Compat::V3, 16),
        compressed: Some("zlib"),
        steps: 60,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 9643,
    });
}

#[test]
fn compressed_64k_v3_zstd() {
    run(Scenario {
        name: "compressed 64K v3 zstd",
        layout: layout(8 * MIB, 65536, Compat::V3, 16),
        compressed: Some("zstd"),
        steps: 50,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 96431,
    });
}

#[test]
fn compressed_4k_v2_zlib() {
    run(Scenario {
        name: "compressed 4K v2 zlib",
        layout: layout(4 * MIB, 4096, Compat::V2, 16),
        compressed: Some("zlib"),
        steps: 60,
        max_snapshots: 5,
        driver: Driver::EngineOnly,
        seed: 942,
    });
}

#[test]
fn compressed_512_v3_refcount64() {
    run(Scenario {
        name: "compressed 512B v3 rc64",
        layout: layout(2 * MIB, 512, Compat::V3, 64),
        compressed: Some("zlib"),
        steps: 50,
        max_snapshots: 4,
        driver: Driver::EngineOnly,
        seed: 95364,
    });
}

#[test]
fn compressed_2m_v3_zlib() {
    run(Scenario {
        name: "compressed 2M v3 zlib",
        layout: layout(16 * MIB, 2 * MIB as u32, Compat::V3, 16),
        compressed: Some("zlib"),
        steps: 25,
        max_snapshots: 3,
        driver: Driver::EngineOnly,
        seed: 923,
    });
}

#[test]
fn interleaved_with_qemu_64k_v3() {
    run(Scenario {
        name: "interleaved 64K v3",
        layout: layout(8 * MIB, 65536, Compat::V3, 16),
        compressed: None,
        steps: 60,
        max_snapshots: 5,
        driver: Driver::Interleaved,
        seed: 7643,
    });
}

#[test]
fn interleaved_with_qemu_4k_v2() {
    run(Scenario {
        name: "interleaved 4K v2",
        layout: layout(4 * MIB, 4096, Compat::V2, 16),
        compressed: None,
        steps: 60,
        max_snapshots: 5,
        driver: Driver::Interleaved,
        seed: 742,
    });
}

/// With 1-bit refcounts no cluster can be shared, so a snapshot cannot exist: creating
/// one must be refused and change nothing (QEMU itself leaks clusters here), while plain
/// writes keep working.
#[test]
fn refcount1_writes_work_and_snapshot_is_refused_cleanly() {
    let seed = common::seed(11);
    let mut rng = StdRng::seed_from_u64(seed);
    let scratch = Scratch::new();
    let path = scratch.path("rc1.qcow2");
    let layout = layout(4 * MIB, 4096, Compat::V3, 1);
    engine::create_qcow2(&path, &layout);
    let mut model = DiskModel::zeroed(layout.size);
    let mut image = engine::open_rw(&path);
    for _ in 0..40 {
        let (offset, data) = random_write(&mut rng, layout.size, 4096);
        image
            .write_at(offset, &data)
            .expect("write on a 1-bit refcount image");
        model.write(offset, &data);
    }
    drop(image);
    verify_with_qemu(&path, &model, "refcount_bits=1 after writes");

    let before = common::read_file(&path);
    let mut image = engine::open_rw(&path);
    let result = image.create_snapshot("cannot-exist");
    assert!(
        result.is_err(),
        "a snapshot on a refcount_bits=1 image must be refused"
    );
    drop(image);
    verify_with_qemu(&path, &model, "refcount_bits=1 after the refused snapshot");
    common::assert_unchanged(&before, &path, "a refused snapshot changed the image file");
}

/// 2-bit refcounts allow three references: two snapshots fit, a third must be refused
/// without leaking or changing anything.
#[test]
fn refcount2_third_snapshot_is_refused_cleanly() {
    let scratch = Scratch::new();
    let path = scratch.path("rc2.qcow2");
    let layout = layout(2 * MIB, 4096, Compat::V3, 2);
    engine::create_qcow2(&path, &layout);
    let mut model = DiskModel::zeroed(layout.size);
    let mut image = engine::open_rw(&path);
    let data = vec![0x5a; 10_000];
    image.write_at(4096 + 7, &data).expect("write");
    model.write(4096 + 7, &data);
    for name in ["one", "two"] {
        image
            .create_snapshot(name)
            .expect("snapshot within refcount range");
        model.create_snapshot(name);
    }
    drop(image);
    verify_with_qemu(&path, &model, "refcount_bits=2 with two snapshots");

    let before = common::read_file(&path);
    let mut image = engine::open_rw(&path);
    assert!(
        image.create_snapshot("three").is_err(),
        "a third snapshot overflows 2-bit refcounts and must be refused"
    );
    drop(image);
    verify_with_qemu(&path, &model, "refcount_bits=2 after the refused snapshot");
    common::assert_unchanged(&before, &path, "a refused snapshot changed the image file");
}
