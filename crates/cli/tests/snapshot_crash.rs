//! Crash safety of snapshot creation (DESIGN §5.4): vmsnap is SIGKILLed at
//! every step of an external memory+disk snapshot of a running guest (debug
//! builds honour `VMSNAP_FAILPOINTS`); the next `snapshot-list` recovers.
//! After each kill: the guest runs with its memory intact, the interrupted
//! snapshot is either fully there or not at all, no file is left that
//! nothing needs, every image checks clean, and the snapshot completed
//! before still reverts exactly.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::Guest;

/// The snapshot files of the test's domain.
fn snapshot_files(bench: &VmsnapCli) -> Vec<PathBuf> {
    lab::dir_entries(&bench.path("state/domains/crashy/snapshots"))
}

#[test]
fn killed_at_every_step_of_an_external_snapshot() {
    let bench = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-crash");
    bench.guard("crashy");
    lab::create_qcow2(&bench.path("vda.qcow2"), "32M");
    let ctl = bench.control_socket();
    let config = bench.write_guest_config("crashy", 160, &[DiskDef::qcow2("vda", "vda.qcow2")]);
    bench.ok(&["define", config.to_str().unwrap()]);
    bench.ok(&["start", "crashy"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    guest.write_pattern("vda", 0, 1 << 20, 0x77).unwrap();
    guest.set_ram_value("keep").unwrap();
    let keep_sum = guest.disk_checksum("vda", 0, 1 << 20).unwrap();
    bench.ok(&["snapshot-create-as", "crashy", "keep", "--external"]);

    // Learn the steps of the operation from a run that completes.
    let log = bench.path("steps.log");
    let out = bench.run_with_env(
        &["snapshot-create-as", "crashy", "probe", "--external"],
        &[("VMSNAP_FAILPOINT_LOG", log.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut steps: Vec<String> = Vec::new();
    for line in fs::read_to_string(&log).unwrap().lines() {
        if line.starts_with("snapshot.create.") && !steps.iter().any(|s| s == line) {
            steps.push(line.to_string());
        }
    }
    assert!(steps.len() >= 4, "too few steps: {steps:?}");
    bench.ok(&["snapshot-delete", "crashy", "probe"]);

    for (i, step) in steps.iter().enumerate() {
        let name = format!("crash{i}");
        let value = format!("value-{i}");
        guest.set_ram_value(&value).unwrap();
        let out = bench.run_with_env(
            &["snapshot-create-as", "crashy", &name, "--external"],
            &[("VMSNAP_FAILPOINTS", step.as_str())],
        );
        assert_eq!(
            out.status.code(),
            None,
            "vmsnap should have been killed at {step}"
        );
        let listed = bench.ok(&["snapshot-list", "crashy", "--name"]);
        let names: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
        assert!(names.contains(&"keep"), "after {step}: {names:?}");
        let recorded = names.contains(&name.as_str());
        assert_eq!(
            recorded,
            step.ends_with("committed"),
            "after {step}: {names:?}"
        );
        // The guest runs on, memory intact.
        assert!(bench.ok(&["list"]).contains("running"), "after {step}");
        assert_eq!(guest.ram_value().unwrap(), value, "after {step}");
        // Only files something needs remain, and they check clean.
        // (A kill after the disks switched leaves the guest on the new
        // overlay, with no snapshot recorded: the layers stay in its chain.)
        let nodes: serde_json::Value =
            serde_json::from_str(&bench.ok(&["qmp", "crashy", "query-named-block-nodes"])).unwrap();
        let open: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["file"].as_str().map(str::to_string))
            .collect();
        for file in snapshot_files(&bench) {
            let stem = file.file_name().unwrap().to_string_lossy().to_string();
            let owner_listed = names
                .iter()
                .any(|n| stem.contains(&format!(".{n}.")) || stem.starts_with(&format!("{n}.")));
            let in_chain = open.contains(&file.display().to_string());
            assert!(
                owner_listed || in_chain,
                "after {step}: orphan {}",
                file.display()
            );
            if stem.ends_with(".qcow2") {
                lab::assert_qemu_img_check(&file);
            }
        }
        if recorded {
            bench.ok(&["snapshot-delete", "crashy", &name]);
        }
    }
    assert!(bench.ok(&["snapshot-list", "crashy", "--name"]).trim() == "keep");

    // The snapshot completed before all this still reverts exactly.
    drop(guest);
    bench.ok(&["snapshot-revert", "crashy", "keep"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "keep");
    assert_eq!(guest.disk_checksum("vda", 0, 1 << 20).unwrap(), keep_sum);
}
