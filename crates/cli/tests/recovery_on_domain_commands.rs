//! The next command on a domain finishes what a killed vmsnap left half done
//! (DESIGN §5.4), whichever command it is: a revert killed after it stopped
//! the old QEMU is finished by `resume` (not only by the snapshot commands),
//! in the run state the user had asked for, before `resume` acts.

use std::fs;
use std::time::Duration;

use vmsnap_testguest::lab::{DiskDef, VmsnapCli};
use vmsnap_testguest::Guest;

#[test]
fn a_revert_killed_mid_way_is_finished_by_the_next_domain_command() {
    let bench = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-recover-dom");
    bench.guard("halfway");
    vmsnap_testguest::lab::create_qcow2(&bench.path("vda.qcow2"), "32M");
    let ctl = bench.control_socket();
    let config = bench.write_guest_config("halfway", 160, &[DiskDef::qcow2("vda", "vda.qcow2")]);
    bench.ok(&["define", config.to_str().unwrap()]);
    bench.ok(&["start", "halfway"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    guest.write_pattern("vda", 0, 1 << 20, 0x31).unwrap();
    guest.set_ram_value("at-s1").unwrap();
    let s1_sum = guest.disk_checksum("vda", 0, 1 << 20).unwrap();
    bench.ok(&["snapshot-create-as", "halfway", "s1", "--external"]);
    guest.write_pattern("vda", 0, 1 << 20, 0x32).unwrap();
    guest.set_ram_value("later").unwrap();
    drop(guest);

    // Learn the revert's steps, then kill one at the first step after the
    // old QEMU was told to stop: from there it can only be finished.
    let log = bench.path("steps.log");
    let out = bench.run_with_env(
        &["snapshot-revert", "halfway", "s1", "--paused"],
        &[("VMSNAP_FAILPOINT_LOG", log.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("snapshot.revert."))
        .map(str::to_string)
        .collect();
    let stop = steps
        .iter()
        .position(|s| s.ends_with("stop-QEMU"))
        .unwrap_or_else(|| panic!("the revert never stopped QEMU: {steps:?}"));
    let victim = steps
        .get(stop + 1)
        .filter(|s| !s.ends_with("committed"))
        .unwrap_or_else(|| panic!("no step between stop and commit: {steps:?}"))
        .clone();
    bench.ok(&["resume", "halfway"]);

    let out = bench.run_with_env(
        &["snapshot-revert", "halfway", "s1", "--paused"],
        &[("VMSNAP_FAILPOINTS", victim.as_str())],
    );
    assert_eq!(out.status.code(), None, "vmsnap should die at {victim}");

    // `resume` first finishes the revert (paused, as asked), then resumes.
    let out = bench.run(&["resume", "halfway"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume after {victim}: {stderr}");
    assert!(
        stderr.contains("finished the interrupted revert to snapshot 's1' (the domain is paused)"),
        "resume after {victim} says what it finished: {stderr}"
    );
    assert!(bench.ok(&["list"]).contains("running"));
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "at-s1");
    assert_eq!(guest.disk_checksum("vda", 0, 1 << 20).unwrap(), s1_sum);
    drop(guest);

    // Nothing is left open: the next command has nothing to finish.
    let out = bench.run(&["suspend", "halfway"]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("note:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bench.ok(&["destroy", "halfway"]);
}
