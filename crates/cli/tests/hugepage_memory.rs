//! A domain with `hugepages = true` (guest RAM from the host's 2 MiB hugetlb
//! pool) end to end with the test guest (TCG): QEMU really maps guest RAM in
//! huge pages, a background external snapshot taken while the guest keeps
//! writing disk and RAM reverts to one instant of both, an internal
//! snapshot reverts exactly, and a pool too small for the guest is refused
//! at start with one line, leaving nothing running.
//!
//! Needs free 2 MiB huge pages for an 160 MiB guest: `scripts/test.sh`
//! raises `vm.nr_hugepages` when it is lower.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmsnap_testguest::lab::{self, DiskDef, VmsnapCli};
use vmsnap_testguest::{pattern_checksum, sha256_hex, Guest};

const MEMORY_MIB: u64 = 160;
/// Each step of the writer owns one region of vda this long.
const REGION: u64 = 64 << 10;
/// The writer stops before its regions leave the 32 MiB disk.
const MAX_STEPS: u64 = 400;
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn pool_count(name: &str) -> u64 {
    fs::read_to_string(format!("{POOL}/{name}"))
        .unwrap_or_else(|e| panic!("{POOL}/{name}: {e} (this kernel has no 2 MiB huge pages)"))
        .trim()
        .parse()
        .unwrap()
}

fn available_pages() -> u64 {
    pool_count("free_hugepages") - pool_count("resv_hugepages")
}

/// The page size the kernel maps QEMU's guest RAM with, from its smaps.
fn guest_ram_page_kib(cli: &VmsnapCli, domain: &str) -> u64 {
    let pid = cli.qemu_pid(domain).expect("QEMU runs");
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_ram = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_ram = line.contains("/memfd:");
        } else if let Some(size) = line.strip_prefix("KernelPageSize:").filter(|_| in_ram) {
            return size.trim().trim_end_matches("kB").trim().parse().unwrap();
        }
    }
    panic!("QEMU {pid} maps no memfd for guest RAM:\n{smaps}");
}

fn seed(step: u64) -> u64 {
    0x4000 + step
}

fn region_sum(guest: &mut Guest, step: u64) -> String {
    guest.disk_checksum("vda", step * REGION, REGION).unwrap()
}

#[test]
fn hugepage_backed_guest_snapshots_and_reverts() {
    let needed = MEMORY_MIB / 2;
    assert!(
        available_pages() >= needed,
        "this test needs {needed} free 2 MiB huge pages and the host has {}: \
         run scripts/test.sh, or sysctl -w vm.nr_hugepages={}",
        available_pages(),
        pool_count("nr_hugepages") + needed
    );
    let cli = VmsnapCli::in_temp_dir(env!("CARGO_BIN_EXE_vmsnap"), "vmsnap-hugepages");
    cli.guard("huge");
    cli.guard("toolarge");
    lab::create_qcow2(&cli.path("vda.qcow2"), "32M");
    let config = cli.write_guest_config(
        "huge",
        MEMORY_MIB as u32,
        &[DiskDef::qcow2("vda", "vda.qcow2")],
    );
    let text = fs::read_to_string(&config).unwrap().replacen(
        &format!("memory_mib = {MEMORY_MIB}\n"),
        &format!("memory_mib = {MEMORY_MIB}\nhugepages = true\n"),
        1,
    );
    fs::write(&config, text).unwrap();
    cli.ok(&["define", config.to_str().unwrap()]);

    // A pool too small: one line, nothing started, nothing taken.
    let too_large = 2 * (pool_count("nr_hugepages") + 1);
    let big = cli.path("toolarge.toml");
    fs::write(
        &big,
        fs::read_to_string(&config)
            .unwrap()
            .replacen("name = \"huge\"", "name = \"toolarge\"", 1)
            .replacen(
                &format!("memory_mib = {MEMORY_MIB}\n"),
                &format!("memory_mib = {too_large}\n"),
                1,
            ),
    )
    .unwrap();
    cli.ok(&["define", big.to_str().unwrap()]);
    let free_before = available_pages();
    let refusal = cli.refused(&["start", "toolarge"]);
    assert!(
        refusal.contains("huge pages") && refusal.contains("vm.nr_hugepages"),
        "{refusal}"
    );
    assert!(cli.qemu_pid("toolarge").is_none());
    assert!(cli.ok(&["dominfo", "toolarge"]).contains("shut off"));
    assert_eq!(available_pages(), free_before);
    cli.ok(&["undefine", "toolarge"]);

    // Started: guest RAM is preallocated from the pool, in 2 MiB pages.
    cli.ok(&["start", "huge"]);
    assert_eq!(guest_ram_page_kib(&cli, "huge"), 2048);
    assert!(
        available_pages() + needed <= free_before,
        "QEMU did not take its {needed} pages from the pool at start"
    );
    let ctl = cli.control_socket();
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();

    // An external snapshot while the guest writes: step n writes region n
    // of vda (O_DIRECT + fsync), then stores n in RAM. Whatever instant the
    // snapshot took, RAM value k means regions 1..=k were on disk and
    // region k+2 was not yet written.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut step = 0;
            while step < MAX_STEPS && !stop.load(Ordering::SeqCst) {
                step += 1;
                guest
                    .write_pattern("vda", step * REGION, REGION, seed(step))
                    .unwrap();
                guest.set_ram_value(&step.to_string()).unwrap();
            }
            (guest, step)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let json: serde_json::Value = serde_json::from_str(&cli.ok(&[
        "snapshot-create-as",
        "huge",
        "ext",
        "--external",
        "--json",
    ]))
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let (mut guest, last_step) = writer.join().unwrap();
    assert_eq!(json["kind"], "external", "{json}");
    assert_eq!(
        json["background"], true,
        "QEMU refused background-snapshot on hugetlb RAM: {json}"
    );
    let pause = json["pause_ms"].as_f64().expect("pause_ms");
    assert!(pause > 0.0 && pause < 1000.0, "{json}");
    assert!(
        (2..MAX_STEPS).contains(&last_step),
        "the writer did {last_step} steps while the snapshot ran"
    );

    // An internal snapshot (QEMU's snapshot-save) of the same guest.
    guest.set_ram_value("internal").unwrap();
    guest.write_pattern("vda", 0, REGION, 0x77).unwrap();
    cli.ok(&["snapshot-create-as", "huge", "int"]);
    guest.set_ram_value("later").unwrap();
    guest.write_pattern("vda", 0, REGION, 0x78).unwrap();
    drop(guest);

    cli.ok(&["snapshot-revert", "huge", "ext"]);
    assert_eq!(guest_ram_page_kib(&cli, "huge"), 2048);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    let at: u64 = guest.ram_value().unwrap().parse().unwrap();
    eprintln!("external snapshot: pause {pause} ms, writer at step {at} of {last_step}");
    assert!(
        (1..=last_step).contains(&at),
        "RAM value {at} after revert, the writer did steps 1..={last_step}"
    );
    for step in 1..=at {
        assert_eq!(
            region_sum(&mut guest, step),
            pattern_checksum(step * REGION, REGION, seed(step)).unwrap(),
            "RAM says step {at} was done, but region {step} is not on the reverted disk"
        );
    }
    if at + 2 <= last_step {
        assert_eq!(
            region_sum(&mut guest, at + 2),
            sha256_hex(&vec![0u8; REGION as usize]),
            "RAM says step {at}, but the disk already has step {}'s write",
            at + 2
        );
    }
    drop(guest);

    cli.ok(&["snapshot-revert", "huge", "int"]);
    let mut guest = Guest::connect(&ctl, Duration::from_secs(60)).unwrap();
    assert_eq!(guest.ram_value().unwrap(), "internal");
    assert_eq!(
        region_sum(&mut guest, 0),
        pattern_checksum(0, REGION, 0x77).unwrap()
    );
    drop(guest);

    let xml = cli.ok(&["snapshot-dumpxml", "huge", "ext"]);
    assert!(xml.contains("<hugepages/>"), "{xml}");
    cli.ok(&["snapshot-delete", "huge", "ext", "--children"]);
    assert_eq!(cli.ok(&["snapshot-list", "huge", "--name"]).trim(), "");
    let free_running = available_pages();
    cli.ok(&["destroy", "huge"]);
    assert_eq!(
        available_pages(),
        free_running + needed,
        "the pages went back to the pool when QEMU ended"
    );
    lab::assert_qemu_img_check(&cli.path("vda.qcow2"));
}
